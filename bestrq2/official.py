"""Read weights saved by the authors' code (``BestRQ2Module`` / ``BestRQModule`` state dicts).

A Lightning ``.ckpt`` is a pickle: it is read with ``torch.load(weights_only=True)`` only. If that
refuses the file we stop and point at the ``.safetensors`` copy; full unpickling happens only with
the explicit ``allow_pickle=True`` opt-in (run it only on files you trust).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from .config import BestRQ2Config
from .frontend import mel_filterbank
from .model import upgrade_key

# authors' key prefix -> ours (then ``model.upgrade_key``: patch_embed.* and predictor_input_proj.* move
# under the context encoder and the predictor, as does a two-stage model's mask_token)
_RENAMES = [
    ("patch_embed.patch_embed.proj.", "patch_embed."),
    ("rq_proj.", "head."),
    ("output_proj.", "head."),
]
_DROPPED = ("spectrogram.", "encoder.pos_embed", "predictor.pos_embed")


def read_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # the safe unpickler refused something in the file
        if not allow_pickle:
            raise ValueError(
                f"{path}: torch.load(weights_only=True) refused this checkpoint ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200]}). A .ckpt is a pickle and can run code when loaded. "
                "Use its .safetensors copy, or pass allow_pickle=True (CLI: --allow-pickle) only for "
                "a file you trust.") from err
        warnings.warn(f"unpickling {path} with weights_only=False (allow_pickle=True)")
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (or a Lightning checkpoint holding one)")
    return obj


def infer_config_fields(sd: dict[str, torch.Tensor]) -> dict:
    """Sizes that the tensors themselves reveal (widths, depths, codebook shape, one/two stage)."""
    def depth(prefix: str) -> int:
        ids = {int(m.group(1)) for k in sd if (m := re.match(rf"{prefix}\.blocks\.(\d+)\.", k))}
        return max(ids) + 1 if ids else 0

    fields: dict = {}
    if "patch_embed.patch_embed.proj.weight" not in sd:
        raise ValueError("not an official BEST-RQ(-2) state dict: patch_embed.patch_embed.proj.weight is missing")
    fields["encoder_dim"] = sd["patch_embed.patch_embed.proj.weight"].shape[0]
    fields["encoder_depth"] = depth("encoder")
    pd = depth("predictor")
    fields["one_stage"] = pd == 0
    if pd:
        fields["predictor_depth"] = pd
        fields["predictor_dim"] = sd["predictor.norm.weight"].shape[0]
    if "quantizer.CB" in sd:
        fields["codebook_size"], fields["codebook_dim"] = sd["quantizer.CB"].shape
    return fields


# How far a checkpoint's mel filterbank may sit from ours and still be the paper's frontend.
# Rounding: torchaudio builds the filters in float32 from 10 ** (mel / 2595); the edge frequencies
# (up to 8 kHz, ulp 4.9e-4 Hz) carry a few ulps of error that depend on the CPU's vector path, and
# the narrowest filter is ~14 Hz wide, so weights move by at most ~2e-3 Hz / 14 Hz ~ 1.5e-4 (seen:
# 1.5e-5 between AVX512 and ATen's scalar path). Another configuration moves them by orders more:
# f_max 7999 instead of 8000 Hz shifts the top edges by ~1 Hz over ~100 Hz (~1e-2), the Slaney
# scale or area normalisation change weights by O(0.1-1). 1e-3 lies between the two.
FILTERBANK_ATOL = 1e-3
_FB_KEY, _WINDOW_KEY = "spectrogram.mel_spec.mel_scale.fb", "spectrogram.mel_spec.spectrogram.window"


def check_frontend(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's STFT window and filterbank if they are the paper's frontend up to float32
    rounding (see ``FILTERBANK_ATOL``); a ValueError naming the difference otherwise."""
    found = {}
    if _FB_KEY in sd:
        fb, ours = sd[_FB_KEY].float(), mel_filterbank()
        if fb.shape != ours.shape:
            raise ValueError(f"the checkpoint's mel filterbank is {list(fb.shape)}, the paper's frontend has "
                             f"{list(ours.shape)} (n_fft 2048, 128 mels); this frontend cannot run it")
        diff = float((fb - ours).abs().max())
        if diff > FILTERBANK_ATOL:
            raise ValueError(f"the checkpoint's mel filterbank differs from the paper's (HTK, 0-8 kHz, no "
                             f"normalisation) by up to {diff:.3g}, beyond float32 rounding ({FILTERBANK_ATOL:g}): "
                             "it was trained on another frontend, which this one cannot run")
        found["fb"] = fb
    if _WINDOW_KEY in sd:
        win = sd[_WINDOW_KEY].float()
        hann = torch.hann_window(win.numel(), periodic=True)
        if win.numel() != hann.numel() or float((win - hann).abs().max()) > 1e-6:
            raise ValueError("the checkpoint's STFT window is not the periodic Hann window of 2048")
        found["window"] = win
    return found


def convert_state_dict(sd: dict[str, torch.Tensor], cfg: BestRQ2Config) -> dict[str, torch.Tensor]:
    """Rename the authors' keys to ours and reshape where our layout differs."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith(_DROPPED):
            continue
        for old, new in _RENAMES:
            if k.startswith(old):
                k = new + k[len(old):]
        if k == "patch_embed.weight":
            v = v.reshape(v.shape[0], -1)  # Conv2d [D, 1, 16, 16] -> Linear [D, 256] (same order)
        elif k == "mask_token":
            v = v.reshape(-1)
        elif k == "quantizer.P":
            k, v = "quantizer.projection", v[None]
        elif k == "quantizer.CB":
            k, v = "quantizer.codebooks", v[None]
        out[upgrade_key(k, cfg.one_stage)] = v.float()
    return out


def load_official(cls, path, allow_pickle: bool = False, **config_fields):
    """Build ``cls`` (BestRQ2 or BestRQ2Encoder) from the authors' weights.

    Sizes come from the tensors; pass what they cannot tell (``encoder_heads``, ``predictor_heads``)
    as keyword fields. Heads default to width // 64 (ViT-B: 12).
    """
    sd = read_state_dict(path, allow_pickle)
    fields = infer_config_fields(sd)
    fields.setdefault("encoder_heads", max(1, fields["encoder_dim"] // 64))
    if not fields["one_stage"]:
        fields.setdefault("predictor_heads", max(1, fields["predictor_dim"] // 64))
    fields["pos_layout"] = "official"
    fields.update(config_fields)
    cfg = BestRQ2Config(**fields)
    frontend_buffers = check_frontend(sd)  # before building anything: a foreign frontend fails first
    model = cls(cfg)
    # the authors' own buffers, not ours recomputed: their float32 filterbank is what their model
    # saw, and ours differs from it by CPU-dependent rounding (see FILTERBANK_ATOL)
    model.frontend.use_buffers(**frontend_buffers)
    state = convert_state_dict(sd, cfg)
    wanted = model.state_dict()
    if not hasattr(model, "head"):  # the inference encoder keeps encoder.* only
        state = {k: v for k, v in state.items() if k in wanted}
    elif cfg.one_stage:  # a two-stage file read as the one-stage baseline (as the fixtures' BEST-RQ (ViT))
        state = {k: v for k, v in state.items() if not k.startswith("predictor.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{path}: weights do not fit the config: {str(err)[:400]}") from err
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit (missing {missing[:6]}, unexpected {unexpected[:6]}); "
                         "check the config fields you passed")
    return model.eval()
