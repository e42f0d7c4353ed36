"""Inference encoder with the X-ARES contract: waveform in, one embedding per 625 ms out."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from .config import HOP, PATCH, SAMPLE_RATE, BestRQ2Config
from .context_encoder import ContextEncoder
from .frontend import LogMel, num_time_patches
from .inputs import check_wave
from .model import upgrade_state_dict
from .tokens import wave_to_grid


def chunk_plan(num_samples: int, chunk: int = 10 * SAMPLE_RATE) -> list[tuple[int, int, int, int]]:
    """How a clip is fed to the encoder, as the authors' X-ARES adapter does: [(start, samples, samples
    fed, frames kept)]. A clip of at most ``chunk`` samples is one piece; a longer one is cut into
    ``chunk``-sample pieces, and a tail under 1 s is zero-padded to 1 s and keeps one frame."""
    if num_samples <= chunk:
        return [(0, num_samples, num_samples, num_time_patches(num_samples))]
    plan = []
    for start in range(0, num_samples, chunk):
        r = min(chunk, num_samples - start)
        if r < SAMPLE_RATE:  # X-ARES: pad a short tail to 1 s, keep 1 frame
            plan.append((start, r, SAMPLE_RATE, max(1, int(num_time_patches(SAMPLE_RATE) * r / SAMPLE_RATE))))
        else:
            plan.append((start, r, r, num_time_patches(r)))
    return plan


def frames_of(num_samples: int, chunk: int = 10 * SAMPLE_RATE) -> int:
    """Frames a clip of ``num_samples`` samples gets: the frames kept of each piece of its ``chunk_plan``."""
    return sum(keep for *_, keep in chunk_plan(num_samples, chunk))


def join_clips(per_clip: list[list[torch.Tensor]]) -> torch.Tensor:
    """Each clip's pieces' frames ([frames kept, D] each, in ``chunk_plan`` order) joined in time and
    zero-padded to the longest clip: [B, T', D]. Shared by ``BestRQ2Encoder`` and ``onnx.OnnxEncoder``."""
    return nn.utils.rnn.pad_sequence([torch.cat(pieces, dim=0) for pieces in per_clip], batch_first=True)


class BestRQ2Encoder(nn.Module):
    """Frozen-use encoder: frontend + context encoder (patch embedding + ViT; no predictor, no head).

    ``encoder(wave, lengths=None)``: float32 [B, T] at 16 kHz, any length -> frames [B, T', D].
    Audio longer than ``config.max_seconds`` (10 s) is cut into 10 s chunks as the authors' X-ARES
    adapter does (a tail under 1 s is zero-padded to 1 s and gives one frame); the chunks' frames
    are joined in time. Each frame averages the 8 frequency patches of one 625 ms column.
    With ``lengths``, every clip gets exactly the frames it would get alone; frames past a clip's
    end are zero (see ``num_output_frames``).
    """

    sampling_rate = SAMPLE_RATE
    hop_size_in_ms = PATCH * HOP * 1000 / SAMPLE_RATE  # 625.0
    # inference on a CPU runs the linears on weights prepacked once for oneDNN (float32 or bf16; see
    # precision.CastWeights): 1.25-1.3x faster in float32 on an AMD EPYC, even on an AMX Xeon, for a packed
    # copy of every linear weight (+4 bytes a weight in float32: 340 MB for ViT-B). False: plain F.linear.
    prepack_cpu_weights: bool = True

    def __init__(self, config: BestRQ2Config | None = None, precision: str = "fp32",
                 cuda_graphs: str = "auto") -> None:
        super().__init__()
        from .cuda_graphs import GraphedFrames, check_mode
        from .precision import CastWeights

        self.config = cfg = (config or BestRQ2Config()).resolved()  # kernels: see BestRQ2Config.kernels
        self.set_precision(precision)
        # "auto": clips of equal length, <= 10 s, batch <= 8 on CUDA replay a captured CUDA graph
        # (bestrq2.cuda_graphs); "on": any batch; "off": never
        self.cuda_graphs = check_mode(cuda_graphs)
        self._cast = CastWeights()  # bf16 / prepacked copies of the linear weights for inference (not a submodule)
        self._graphed = GraphedFrames()
        self.frontend = LogMel()
        self.encoder = ContextEncoder(cfg)  # the same module, and forward, as pretraining's
        upgrade_state_dict(self, one_stage=True)  # earlier files: patch_embed.* beside encoder.*
        self.eval()

    def set_precision(self, precision: str) -> "BestRQ2Encoder":
        """"fp32" (default: float32 throughout), "bf16" (the patch embedding and the
        transformer under bf16 autocast; frontend and positions stay float32), or "auto" (bf16 on CUDA
        and on CPUs with AMX / AVX512-BF16, else fp32; see ``bestrq2.precision``). Frames come out float32."""
        from .precision import resolve

        resolve(precision, torch.device("cpu"))  # validates the name
        self.precision = precision
        return self

    @property
    def precision_in_use(self) -> str:
        """What ``precision`` means on this encoder's device, in words (e.g. 'bf16 (auto: this CPU has AMX)')."""
        from .precision import resolve

        return resolve(self.precision, self.device)[1]

    @property
    def output_dim(self) -> int:
        return self.config.encoder_dim

    @property
    def device(self) -> torch.device:
        return self.encoder.patch_embed.weight.device

    # ------------------------------------------------------------------ core
    def tokens(self, wave: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Patch grid of clips of at most ``max_seconds``: [B, 8 * W, D] (token f * W + t).

        With ``lengths``, W is the longest clip's width and a shorter clip's padding columns are zero.
        """
        wave, lengths = check_wave(wave, lengths)
        if wave.shape[1] > self.config.chunk_samples and (lengths is None or int(lengths.max()) > self.config.chunk_samples):
            raise ValueError(f"tokens() takes clips of at most {self.config.max_seconds:g} s; "
                             "call the encoder itself for frame embeddings of longer audio")
        if lengths is not None:
            wave = wave[:, : int(lengths.max())]
        return self._tokens(wave.to(self.device), lengths)

    def _tokens(self, wave: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        from .precision import announce

        grid = wave_to_grid(self.frontend, wave, lengths)  # float32 whatever the precision
        dtype = announce(self.precision, self.device)
        args = (grid.raw.to(self.encoder.patch_embed.weight.dtype),
                grid.positions(self.config.encoder_dim, self.config.pos_layout), grid.key_padding)
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if not torch.is_grad_enabled() and self._cached_weights(dtype):
                # the linear weights cast (and on a CPU prepacked) once, not on every call
                out = self._cast.run(self.encoder, dtype or torch.float32, *args, pack=self.prepack_cpu_weights)
            else:
                out = self.encoder(*args)
        out = out.float() if dtype is not None else out
        if grid.key_padding is not None:
            out = out.masked_fill(grid.key_padding[..., None], 0.0)
        return out

    def _cached_weights(self, dtype: torch.dtype | None) -> bool:
        """Run the linears on ``precision.CastWeights``' copies? Always under bf16; under float32 with float32
        weights on a CPU where oneDNN's prepacked float32 linear runs (and ``prepack_cpu_weights``)."""
        from .precision import packed_linear_available

        if dtype is not None:
            return True
        return (self.prepack_cpu_weights and self.device.type == "cpu"
                and self.encoder.patch_embed.weight.dtype == torch.float32 and packed_linear_available(torch.float32))

    def _frames(self, wave: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """Clips <= max_seconds -> frames [B, W_max, D] (mean over the 8 frequency patches)."""
        tok = self._tokens(wave, lengths)
        fp = self.config.freq_patches
        return tok.unflatten(1, (fp, tok.shape[1] // fp)).mean(dim=1)

    # --------------------------------------------------------------- public
    def num_output_frames(self, num_samples: int) -> int:
        """Frames the encoder gives a clip of ``num_samples`` samples."""
        return frames_of(num_samples, self.config.chunk_samples)

    def to_onnx(self, path: str | os.PathLike, portable: bool = False) -> Path:
        """Write this encoder as ONNX (dynamic batch and length; see ``bestrq2.onnx``); run it with
        ``bestrq2.onnx.OnnxEncoder``. ``portable=True``: standard ONNX ops only (any runtime), where the
        default uses onnxruntime's fused contrib ops."""
        from .onnx import export_onnx

        return export_onnx(self, path, portable=portable)

    @torch.no_grad()
    def forward(self, wave: torch.Tensor, lengths: torch.Tensor | None = None,
                sample_rate: int | None = None, max_batch: int = 64) -> torch.Tensor:
        wave, lengths = check_wave(wave, lengths, sample_rate)
        wave = wave.to(self.device)
        b, t = wave.shape
        chunk = self.config.chunk_samples
        lens = lengths.tolist() if lengths is not None else [t] * b
        if max(lens) <= chunk and b <= max_batch:
            if self._use_graph(b, lens, t):
                from .precision import weights_key

                return self._graphed(self._equal_frames, wave, (self.precision, weights_key(self)),
                                     first_eager=self.cuda_graphs == "auto")
            return self._frames(wave[:, : max(lens)], lengths)
        # cut every clip into <= 10 s pieces at its own length, run the pieces as padded batches
        pieces = [(i, *piece) for i, n in enumerate(lens) for piece in chunk_plan(n, chunk)]
        outs: list[torch.Tensor] = []
        for s in range(0, len(pieces), max_batch):
            group = pieces[s: s + max_batch]  # (clip, start, samples, samples fed, frames kept)
            batch = wave.new_zeros(len(group), max(g[3] for g in group))
            for j, (i, start, r, _, _) in enumerate(group):
                batch[j, :r] = wave[i, start: start + r]
            outs.extend(self._frames(batch, torch.tensor([g[3] for g in group])).unbind(0))
        per_clip: list[list[torch.Tensor]] = [[] for _ in range(b)]
        for (i, _, _, _, keep), fr in zip(pieces, outs):
            per_clip[i].append(fr[:keep])
        return join_clips(per_clip)

    def _equal_frames(self, wave: torch.Tensor) -> torch.Tensor:
        return self._frames(wave, None)

    def _use_graph(self, batch: int, lens: list[int], samples: int) -> bool:
        """Replay a CUDA graph for this call? CUDA, equal-length clips filling the batch, and the mode."""
        from .cuda_graphs import AUTO_MAX_BATCH

        if self.cuda_graphs == "off" or self.device.type != "cuda":  # (forward runs without gradients)
            return False
        if any(n != samples for n in lens):
            return False
        return self.cuda_graphs == "on" or batch <= AUTO_MAX_BATCH

    # ------------------------------------------------------------------- io
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` (encoder weights only)."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = d / "model.safetensors.tmp"
        save_file(state, str(tmp), metadata={"format": "pt", "bestrq2": "encoder"})
        os.replace(tmp, d / "model.safetensors")
        (d / "config.json").write_text(self.config.to_json())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu",
                        precision: str = "fp32", cuda_graphs: str = "auto") -> "BestRQ2Encoder":
        from safetensors.torch import load_file

        d = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name} not found: from_pretrained needs a directory written "
                                        "by save_pretrained (or `bestrq2 export`)")
        cfg = BestRQ2Config.from_dict(json.loads((d / "config.json").read_text()))
        enc = cls(cfg, cuda_graphs=cuda_graphs)
        state = load_file(str(d / "model.safetensors"), device="cpu")
        try:
            missing, unexpected = enc.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(f"{d}: weights do not fit config.json: {str(err)[:400]}") from err
        if missing or unexpected:
            raise ValueError(f"{d}: weights do not fit the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
        return enc.to(map_location).eval().set_precision(precision)

    @classmethod
    def from_official(cls, path, allow_pickle: bool = False, **config_fields) -> "BestRQ2Encoder":
        """The authors' Lightning ``.ckpt`` or its ``.safetensors`` copy -> encoder (pos_layout 'official')."""
        from .official import load_official

        return load_official(cls, path, allow_pickle=allow_pickle, **config_fields)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
