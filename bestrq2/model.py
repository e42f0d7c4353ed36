"""BEST-RQ-2: a context encoder on visible patches, a predictor that fills the masked slots, a
head that predicts each masked patch's frozen random-projection code.

Also the paper's one-stage baseline BEST-RQ (ViT) (``config.one_stage``): all tokens into the
encoder with masked patch embeddings replaced by a mask token, head on the encoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import PATCH, BestRQ2Config
from .frontend import LogMel, num_time_patches, patchify, truncate_to_patches
from .inputs import check_wave, copy_to_device, pcm16_to_float
from .kept import kept
from .context_encoder import ContextEncoder
from .kernels import gather_tokens, linear_cross_entropy
from .masking import MaskPlan, check_mask, sample_mask
from .positions import positions_for
from .predictor import Predictor
from .quantizer import RandomProjectionQuantizer
from .tokens import target_padding

IGNORE = -100


@dataclass
class PretrainBatch:
    """One step's inputs on the model's device (``BestRQ2.prepare``)."""

    wave: torch.Tensor  # float32 [B, T]
    plan: MaskPlan
    target_padding: torch.Tensor | None  # bool [B, N]: patches wholly in padding (not targets), or None


@dataclass
class PretrainOutput:
    loss: torch.Tensor  # [] mean cross-entropy over masked targets (mean over codebooks)
    targets: torch.Tensor  # int64 [B, M, C]; -100 where a patch lies wholly in padding
    mask: torch.Tensor  # bool [B, N], True = masked
    mask_idx: torch.Tensor  # int64 [B, M]
    accuracy: torch.Tensor  # [] top-1 accuracy over the counted targets (no grad)
    hidden: torch.Tensor  # [B, M, D] the head's input at the masked positions
    head: nn.Linear
    num_codebooks: int

    @property
    def logits(self) -> torch.Tensor:
        """[B, M, C, K] at the masked positions (ascending token order). Computed on demand: the fused
        head never materialises them during training."""
        return self.head(self.hidden).unflatten(-1, (self.num_codebooks, -1))


# Weight names before the context encoder and the predictor were modules of their own (also the
# authors' names, after official.py's renames): loaded checkpoints and encoders are upgraded on load
LEGACY_KEYS = (("patch_embed.", "encoder.patch_embed."), ("predictor_input_proj.", "predictor.input_proj."))


def upgrade_key(name: str, one_stage: bool) -> str:
    """A weight name of any earlier layout -> this one (unchanged if already current)."""
    for old, new in LEGACY_KEYS:
        if name.startswith(old):
            return new + name[len(old):]
    return "predictor.mask_token" if name == "mask_token" and not one_stage else name


def upgrade_state_dict(module: nn.Module, one_stage: bool) -> None:
    """Register a load hook on ``module`` that renames earlier weight names (``upgrade_key``)."""
    def hook(state_dict, prefix, *_):
        for k in [k for k in state_dict if k.startswith(prefix)]:
            new = prefix + upgrade_key(k[len(prefix):], one_stage)
            if new != k and new not in state_dict:
                state_dict[new] = state_dict.pop(k)

    module._register_load_state_dict_pre_hook(hook)


class BestRQ2(nn.Module):
    """The pretraining module. ``forward(wave, lengths=None, mask=None) -> PretrainOutput``.

    ``encoder`` (ContextEncoder: patch embedding + ViT, the product), ``predictor`` (Predictor, None for
    the one-stage baseline), ``head`` (the code classifier), a frozen ``quantizer`` and the ``frontend``.
    The implementation of each fast op comes from ``config.kernels``, resolved here once (environment
    overrides included) and kept in ``self.config``, which is what checkpoints save."""

    def __init__(self, config: BestRQ2Config | None = None) -> None:
        super().__init__()
        self.config = cfg = (config or BestRQ2Config()).resolved()
        self.frontend = LogMel()
        self.quantizer = RandomProjectionQuantizer(cfg.patch_dim, cfg.codebook_dim, cfg.codebook_size,
                                                   cfg.num_codebooks, seed=cfg.seed, norm=cfg.rpq_norm,
                                                   impl=cfg.kernels["rpq"])
        self.encoder = ContextEncoder(cfg)
        if cfg.one_stage:
            self.predictor = None
            self.mask_token = nn.Parameter(torch.zeros(cfg.encoder_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        else:
            self.predictor = Predictor(cfg)
        head_dim = cfg.encoder_dim if cfg.one_stage else cfg.predictor_dim
        self.head = nn.Linear(head_dim, cfg.num_codebooks * cfg.codebook_size)
        upgrade_state_dict(self, cfg.one_stage)

    # ------------------------------------------------------------------ pieces
    @torch.no_grad()
    def targets(self, wave: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Codes of every patch: int64 [B, N, num_codebooks]."""
        wave, lengths = check_wave(wave, lengths)
        spec = truncate_to_patches(self.frontend(wave.to(self.head.weight.device)))
        return self.quantizer.codes(spec).reshape(wave.shape[0], -1, self.quantizer.num_codebooks)

    def _pos_table(self, num_tokens: int, width: int, dim: int) -> torch.Tensor:
        """Sincos rows of the N grid slots, float32 [N, dim] (the pretraining grid is the same for every clip).
        A constant: kept per grid, width, layout and device once built (``bestrq2.kept``; not in the state
        dict), where each step rebuilt it in ~15 ops, each a launch on a GPU, twice a step."""
        device, layout = self.head.weight.device, self.config.pos_layout
        return kept(self.__dict__.setdefault("_pos_tables", {}), (num_tokens, width, dim, layout, device), device,
                    lambda: positions_for(torch.arange(num_tokens, device=device), width, dim, layout))

    # ---------------------------------------------------------------- forward
    def forward(self, wave: torch.Tensor, lengths: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, generator: torch.Generator | None = None) -> PretrainOutput:
        """wave float32 [B, T] at 16 kHz; lengths int [B] (true samples) or None;
        mask bool [N] or [B, N] (True = masked) to fix the step, else drawn (``config.mask_mode``).
        ``prepare`` (host) then ``forward_batch`` (device); a ``PretrainBatch`` (already prepared, as the
        training loop passes through DDP / FSDP / torch.compile wrappers) goes straight to the device side."""
        if isinstance(wave, PretrainBatch):
            return self.forward_batch(wave)
        return self.forward_batch(self.prepare(wave, lengths, mask, generator))

    def prepare(self, wave: torch.Tensor, lengths: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> PretrainBatch:
        """Host side of a step: check the wave where it lies (pass CPU tensors, pinned for a CUDA model,
        and nothing reads the device back), draw or check the mask on the host, build the index sets and
        the padding targets, and copy them to the model's device without blocking. ``wave`` may also be
        int16 PCM (the training loader's batches from prepared shards): half the bytes to copy, nothing to
        check, scaled by 1 / 32768 on the device (exact: the same float32 samples as the float path)."""
        cfg = self.config
        wave, lengths = check_wave(wave, lengths, pcm16=True)  # int16: the loader's shards, scaled on the device
        b, t = wave.shape
        n = cfg.freq_patches * num_time_patches(t)
        if mask is None:
            mask = sample_mask(b, n, (cfg.mask_ratio_min, cfg.mask_ratio_max), cfg.mask_mode,
                               generator=generator, equal_counts=cfg.mask_equal_counts)
        mask = check_mask(mask.cpu(), b, n, equal_counts=cfg.mask_equal_counts)  # a CUDA mask is read once here
        device = self.head.weight.device
        pad = target_padding(lengths, t)
        if pad is not None and cfg.loss_on_padding:
            pad = None
        plan = MaskPlan.from_mask(mask).to(device)  # copied beside the compute stream on CUDA, as the wave
        wave, pad = copy_to_device([wave, pad], device)
        for t in (plan.mask_idx, plan.keep_idx, plan.mask_valid, plan.keep_pad, plan.rest):
            if t is not None:  # the masked count varies per step (26 sizes at the paper's U[0.4, 0.6] of
                torch._dynamo.maybe_mark_dynamic(t, 1)  # 128): compile one graph for all, not one each
        return PretrainBatch(pcm16_to_float(wave), plan, pad)

    def forward_batch(self, batch: PretrainBatch) -> PretrainOutput:
        """Device side of a step: grid -> targets -> context -> predict -> loss. No host reads (ragged
        masks excepted), so it runs asynchronously and compiles to one graph."""
        cfg, plan, gather = self.config, batch.plan, self._gather
        spec = truncate_to_patches(self.frontend(batch.wave))  # [B, 128, 16 W], float32 under any autocast
        targets = self._masked_targets(spec, plan, batch.target_padding)
        raw, width = patchify(spec), spec.shape[-1] // PATCH  # [B, N, 256], N = 8 W
        pos = self._pos_table(raw.shape[1], width, cfg.encoder_dim)
        if cfg.one_stage:  # every patch in, the masked ones as the mask token
            hidden = gather(self.encoder(raw, pos, replace=(plan.mask, self.mask_token)), plan.mask_idx)
        else:  # the visible patches only (their raw rows gathered first); the predictor fills in the rest
            context = self.encoder(gather(raw, plan.keep_idx), pos[plan.keep_idx], plan.keep_pad)
            hidden = self.predictor(context, plan, self._pos_table(raw.shape[1], width, cfg.predictor_dim))
        loss, acc = self._head_loss(hidden, targets)
        return PretrainOutput(loss, targets, plan.mask, plan.mask_idx, acc, hidden, self.head, cfg.num_codebooks)

    def _gather(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return gather_tokens(x, idx, impl=self.config.kernels["gather"])

    @torch.no_grad()
    def _masked_targets(self, spec: torch.Tensor, plan: MaskPlan, padding: torch.Tensor | None) -> torch.Tensor:
        """Codes of the masked patches only, read straight from the spectrogram: int64 [B, M, C], IGNORE
        where a patch lies wholly in padding or fills a ragged row."""
        q = self.quantizer
        b = spec.shape[0]
        targets = q.codes(spec, plan.mask_idx).reshape(b, -1, q.num_codebooks)
        ignore = None if padding is None else torch.gather(padding, 1, plan.mask_idx)
        if plan.mask_valid is not None:
            ignore = ~plan.mask_valid if ignore is None else ignore | ~plan.mask_valid
        return targets if ignore is None else targets.masked_fill(ignore[..., None], IGNORE)

    def _head_loss(self, h: torch.Tensor, targets: torch.Tensor):
        """Head + cross-entropy over the counted targets (a batch with none gives loss 0, no branch)."""
        cfg = self.config
        w, b = self.head.weight, self.head.bias
        if torch.is_autocast_enabled(h.device.type):  # what nn.Linear would run in under autocast
            dt = torch.get_autocast_dtype(h.device.type)
            h, w, b = h.to(dt), w.to(dt), b.to(dt)
        else:
            h = h.to(w.dtype)
        c, d = cfg.num_codebooks, h.shape[-1]
        with torch.autocast(h.device.type, enabled=False):
            loss, acc = linear_cross_entropy(h.reshape(-1, d), w.view(c, -1, d), b.view(c, -1),
                                             targets.reshape(-1, c), IGNORE, impl=cfg.kernels["head"])
        return loss, acc.mean()

    # ---------------------------------------------------------------- export
    def to_encoder(self):
        """The inference encoder: this model's context encoder (weights copied) and frontend, with every
        op on "auto" (an exported encoder runs wherever it is loaded, whatever this run forced)."""
        import dataclasses

        from .encoder import BestRQ2Encoder

        with torch.random.fork_rng(devices=[]):  # building it must not move the training run's RNG
            enc = BestRQ2Encoder(dataclasses.replace(self.config, kernels={}))
        enc.encoder.load_state_dict(self.encoder.state_dict())
        enc.frontend.use_buffers(window=self.frontend.window, fb=self.frontend.fb)
        return enc.to(self.head.weight.device)

    @classmethod
    def from_official(cls, path, allow_pickle: bool = False, **config_fields) -> "BestRQ2":
        """The authors' Lightning ``.ckpt`` (or its ``.safetensors`` copy) -> BestRQ2, pos_layout 'official'."""
        from .official import load_official

        return load_official(cls, path, allow_pickle=allow_pickle, **config_fields)

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
