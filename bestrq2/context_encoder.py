"""The context encoder: patch embedding, positions and ViT blocks (the pretrained product).

``ContextEncoder(config)(raw, pos, key_padding=None) -> [B, L, D]``: raw log-mel patches [B, L, 256]
(any subset of a clip's grid: the visible ones in pretraining, all of them at inference) with their
sincos rows ``pos`` [B, L, D] or [L, D]. ``BestRQ2`` and ``BestRQ2Encoder`` both run it, so the
pretraining and the inference forward are one piece of code. Weight names: ``patch_embed.*``,
``blocks.*``, ``norm.*`` (the authors' ``encoder.*`` layout under its ``encoder.`` prefix).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import BestRQ2Config
from .transformer import Transformer


class ContextEncoder(Transformer):
    def __init__(self, config: BestRQ2Config) -> None:
        cfg, ops = config, config.kernels
        # built before the blocks (a plain local until Module.__init__ has run): the same draws of
        # the global RNG, in the same order, as when the embedding was a sibling module
        patch_embed = nn.Linear(cfg.patch_dim, cfg.encoder_dim)  # = Conv2d(1, D, 16, stride 16)
        super().__init__(cfg.encoder_dim, cfg.encoder_depth, cfg.encoder_heads, cfg.mlp_ratio,
                         cfg.encoder_drop_path, ops.get("attention", "auto"), ops.get("block", "auto"))
        self.patch_embed = patch_embed

    def forward(self, raw: torch.Tensor, pos: torch.Tensor, key_padding: torch.Tensor | None = None,
                replace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """raw [B, L, 256] -> [B, L, D]. ``replace = (mask bool [B, L], token [D])`` puts ``token``
        in place of the masked patches' embeddings (the one-stage BEST-RQ baseline)."""
        x = self.patch_embed(raw)
        if replace is not None:
            mask, token = replace
            x = torch.where(mask[..., None], token.to(x.dtype), x)
        # under autocast the residual stream is float32: the positions are added, not rounded to bf16
        x = x + pos if torch.is_autocast_enabled(x.device.type) else x + pos.to(x.dtype)
        return super().forward(x, key_padding)
