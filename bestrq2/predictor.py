"""The predictor (dropped after pretraining): fills the masked slots and predicts from them.

``Predictor(config)(context, plan, pos) -> [B, M, Dp]``: the context encoder's output at the visible
slots, [B, V, De], is projected to the predictor's width and put at its grid slots; every masked slot
gets the mask token + its sincos row (``pos`` [N, Dp]); the blocks run over the whole grid, and the
output at the masked slots (``plan.mask_idx`` order) is what the head reads. Weight names:
``input_proj.*``, ``mask_token``, ``blocks.*``, ``norm.*``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import BestRQ2Config
from .kernels import gather_tokens, scatter_tokens
from .masking import MaskPlan
from .transformer import Transformer


class Predictor(Transformer):
    def __init__(self, config: BestRQ2Config) -> None:
        cfg, ops = config, config.kernels
        input_proj = nn.Linear(cfg.encoder_dim, cfg.predictor_dim)  # before the blocks: the RNG order of old
        super().__init__(cfg.predictor_dim, cfg.predictor_depth, cfg.predictor_heads, cfg.mlp_ratio,
                         cfg.predictor_drop_path, ops.get("attention", "auto"), ops.get("block", "auto"))
        self.input_proj = input_proj
        self.mask_token = nn.Parameter(torch.zeros(cfg.predictor_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.gather_impl, self.scatter_impl = ops.get("gather", "auto"), ops.get("scatter", "auto")

    def forward(self, context: torch.Tensor, plan: MaskPlan, pos: torch.Tensor) -> torch.Tensor:
        x = scatter_tokens(self.input_proj(context), plan.keep_idx, self.mask_token, plan.fill_idx, pos,
                           impl=self.scatter_impl)
        if plan.ragged:  # padding slots of short rows are masked tokens: give them the mask token
            x = torch.where(plan.mask[..., None], (self.mask_token + pos).to(x.dtype), x)
        return gather_tokens(super().forward(x), plan.mask_idx, impl=self.gather_impl)
