"""BEST-RQ-2: a context encoder on visible patches, a predictor that fills the masked slots, a
head that predicts each masked patch's frozen random-projection code.

Also the paper's one-stage baseline BEST-RQ (ViT) (``config.one_stage``): all tokens into the
encoder with masked patch embeddings replaced by a mask token, head on the encoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import BestRQ2Config
from .frontend import LogMel
from .inputs import check_wave
from .kernels import gather_tokens, linear_cross_entropy, rpq_codes, scatter_tokens
from .masking import check_mask, mask_to_indices, ragged_indices, sample_mask
from .positions import positions_for
from .quantizer import RandomProjectionQuantizer
from .tokens import wave_to_grid
from .transformer import Transformer

IGNORE = -100


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


class BestRQ2(nn.Module):
    """The pretraining module. ``forward(wave, lengths=None, mask=None) -> PretrainOutput``."""

    def __init__(self, config: BestRQ2Config | None = None) -> None:
        super().__init__()
        self.config = cfg = config or BestRQ2Config()
        self.frontend = LogMel()
        self.quantizer = RandomProjectionQuantizer(cfg.patch_dim, cfg.codebook_dim, cfg.codebook_size,
                                                   cfg.num_codebooks, seed=cfg.seed)
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.encoder_dim)  # = Conv2d(1, D, 16, stride 16)
        self.encoder = Transformer(cfg.encoder_dim, cfg.encoder_depth, cfg.encoder_heads, cfg.mlp_ratio,
                                   cfg.encoder_drop_path, cfg.attention)
        if cfg.one_stage:
            head_dim = cfg.encoder_dim
            self.predictor_input_proj = None
            self.predictor = None
        else:
            head_dim = cfg.predictor_dim
            self.predictor_input_proj = nn.Linear(cfg.encoder_dim, cfg.predictor_dim)
            self.predictor = Transformer(cfg.predictor_dim, cfg.predictor_depth, cfg.predictor_heads,
                                         cfg.mlp_ratio, cfg.predictor_drop_path, cfg.attention)
        self.mask_token = nn.Parameter(torch.zeros(head_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(head_dim, cfg.num_codebooks * cfg.codebook_size)

    # ------------------------------------------------------------------ pieces
    @torch.no_grad()
    def targets(self, wave: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Codes of every patch: int64 [B, N, num_codebooks]."""
        wave, lengths = check_wave(wave, lengths)
        grid = wave_to_grid(self.frontend, wave, lengths, exact_lengths=False)
        q = self.quantizer
        return rpq_codes(grid.spec, q.projection, q.codebooks).reshape(wave.shape[0], grid.num_tokens, -1)

    def _pos_table(self, num_tokens: int, width: int, dim: int) -> torch.Tensor:
        """Sincos rows of the N grid slots, [N, dim] (the pretraining grid is the same for every clip)."""
        idx = torch.arange(num_tokens, device=self.head.weight.device)
        return positions_for(idx, width, dim, self.config.pos_layout)

    # ---------------------------------------------------------------- forward
    def forward(self, wave: torch.Tensor, lengths: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, generator: torch.Generator | None = None) -> PretrainOutput:
        """wave float32 [B, T] at 16 kHz; lengths int [B] (true samples) or None;
        mask bool [N] or [B, N] (True = masked) to fix the step, else drawn (``config.mask_mode``)."""
        cfg = self.config
        wave, lengths = check_wave(wave, lengths)
        wave = wave.to(self.head.weight.device)
        # the paper's code analyses padding as audio; lengths only mark which targets are padding
        grid = wave_to_grid(self.frontend, wave, lengths, exact_lengths=False)
        b, n = grid.raw.shape[:2]
        if mask is None:
            mask = sample_mask(b, n, (cfg.mask_ratio_min, cfg.mask_ratio_max), cfg.mask_mode,
                               generator=generator, device=wave.device, equal_counts=cfg.mask_equal_counts)
        mask = check_mask(mask.to(wave.device), b, n, equal_counts=cfg.mask_equal_counts)
        counts = mask.sum(1)
        ragged = bool((counts != counts[0]).any())
        if ragged:  # unequal counts: padded index sets, padding flagged
            mask_idx, mask_valid, keep_idx, keep_pad, rest = ragged_indices(mask)
        else:
            mask_idx, keep_idx = mask_to_indices(mask)
            mask_valid, keep_pad, rest = None, None, mask_idx

        with torch.no_grad():  # codes of the masked patches only, read straight from the spectrogram
            q = self.quantizer
            targets = rpq_codes(grid.spec, q.projection, q.codebooks, index=mask_idx).reshape(b, -1, q.num_codebooks)
            if grid.target_padding is not None and not cfg.loss_on_padding:
                pad = torch.gather(grid.target_padding, 1, mask_idx)
                targets = targets.masked_fill(pad[..., None], IGNORE)
            if mask_valid is not None:
                targets = targets.masked_fill(~mask_valid[..., None], IGNORE)

        tokens = self.patch_embed(grid.raw)  # [B, N, De]
        if cfg.one_stage:
            h = self._one_stage(tokens, mask, mask_idx, grid.width)
        else:
            h = self._two_stage(tokens, mask_idx, keep_idx, grid.width, mask, keep_pad, rest)
        loss, acc = self._head_loss(h, targets, check_empty=grid.target_padding is not None or ragged)
        return PretrainOutput(loss, targets, mask, mask_idx, acc, h, self.head, cfg.num_codebooks)

    def _head_loss(self, h: torch.Tensor, targets: torch.Tensor, check_empty: bool):
        cfg = self.config
        if check_empty and not bool((targets != IGNORE).any()):  # a batch of padding only
            return h.sum() * 0.0 + self.head.weight.sum() * 0.0, torch.zeros((), device=h.device)
        if not cfg.fused_head:
            return masked_code_loss(self.head(h).unflatten(-1, (cfg.num_codebooks, cfg.codebook_size)), targets)
        w, b = self.head.weight, self.head.bias
        if h.is_cuda and torch.is_autocast_enabled("cuda"):  # what nn.Linear would run in under autocast
            dt = torch.get_autocast_dtype("cuda")
            h, w, b = h.to(dt), w.to(dt), b.to(dt)
        else:
            h = h.to(w.dtype)
        c, d = cfg.num_codebooks, h.shape[-1]
        with torch.autocast(h.device.type, enabled=False):
            loss, acc = linear_cross_entropy(h.reshape(-1, d), w.view(c, -1, d), b.view(c, -1),
                                             targets.reshape(-1, c), IGNORE)
        return loss, acc.mean()

    def _two_stage(self, tokens, mask_idx, keep_idx, width, mask, keep_pad=None, rest=None):
        cfg = self.config
        n = tokens.shape[1]
        visible = gather_tokens(tokens, keep_idx, self._pos_table(n, width, cfg.encoder_dim))
        context = self.encoder(visible, keep_pad)  # [B, V, De]; a ragged row's tail is padding
        ctx = self.predictor_input_proj(context)
        # grid order: context at its slots (no position added), mask token + position elsewhere
        pos_pred = self._pos_table(n, width, cfg.predictor_dim)
        pred_in = scatter_tokens(ctx, keep_idx, self.mask_token, rest, pos_pred)
        if keep_pad is not None:  # padding slots of short rows are masked tokens: give them the mask token
            pred_in = torch.where(mask[..., None], (self.mask_token + pos_pred).to(pred_in.dtype), pred_in)
        pred = self.predictor(pred_in)
        return gather_tokens(pred, mask_idx)

    def _one_stage(self, tokens, mask, mask_idx, width):
        cfg = self.config
        x = torch.where(mask[..., None], self.mask_token.to(tokens.dtype), tokens)
        x = x + self._pos_table(tokens.shape[1], width, cfg.encoder_dim)
        return gather_tokens(self.encoder(x), mask_idx)

    # ---------------------------------------------------------------- export
    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights the inference encoder keeps: patch_embed.* and encoder.*."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(("patch_embed.", "encoder."))}

    def to_encoder(self):
        from .encoder import BestRQ2Encoder

        with torch.random.fork_rng(devices=[]):  # building it must not move the training run's RNG
            enc = BestRQ2Encoder(self.config)
        enc.load_state_dict(self.encoder_state_dict())
        return enc.to(self.head.weight.device)

    @classmethod
    def from_official(cls, path, allow_pickle: bool = False, **config_fields) -> "BestRQ2":
        """The authors' Lightning ``.ckpt`` (or its ``.safetensors`` copy) -> BestRQ2, pos_layout 'official'."""
        from .official import load_official

        return load_official(cls, path, allow_pickle=allow_pickle, **config_fields)

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def masked_code_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, M, C, K], targets [B, M, C] (IGNORE skipped) -> (mean over codebooks of each
    codebook's mean CE, top-1 accuracy). A batch with no counted target gives loss 0 with a grad."""
    c, k = logits.shape[-2:]
    flat_logits = logits.reshape(-1, c, k).float()
    flat_t = targets.reshape(-1, c)
    valid = flat_t != IGNORE
    if not bool(valid.any()):
        return logits.sum() * 0.0, torch.zeros((), device=logits.device)
    losses = [F.cross_entropy(flat_logits[:, i], flat_t[:, i], ignore_index=IGNORE) for i in range(c)]
    with torch.no_grad():
        acc = ((flat_logits.argmax(-1) == flat_t) & valid).sum() / valid.sum()
    return torch.stack(losses).mean(), acc
