"""FLOP count of one pretraining step, for MFU.

Per token and block: 24 D^2 (qkv, proj, 2-layer MLP with ratio 4: 2 * (3 + 1 + 8) D^2 multiply-adds
counted as 2 FLOPs each) plus 4 L D for attention scores and values over L tokens. Encoder on the
N - M visible tokens, predictor on all N, input projection on N - M, head on M masked tokens
(2 D K C), patch embedding on the tokens the encoder sees (2 * 256 D). Forward x 3 = forward +
backward. The frontend and the quantizer are left out (under 1% at the paper's shapes).
"""
from __future__ import annotations

from .config import BestRQ2Config


def transformer_flops(tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    per_block = tokens * (2 * (4 + 2 * mlp_ratio) * dim * dim) + 4 * tokens * tokens * dim
    return depth * per_block


def pretrain_step_flops(cfg: BestRQ2Config, batch: int, num_tokens: int = 128, num_masked: int = 64) -> float:
    """FLOPs of forward + backward for one batch."""
    n, m = num_tokens, num_masked
    enc_tokens = n if cfg.one_stage else n - m
    f = 2 * cfg.patch_dim * cfg.encoder_dim * enc_tokens  # two-stage embeds the visible patches only
    f += transformer_flops(enc_tokens, cfg.encoder_dim, cfg.encoder_depth, cfg.mlp_ratio)
    if cfg.one_stage:
        head_dim = cfg.encoder_dim
    else:
        head_dim = cfg.predictor_dim
        f += 2 * cfg.encoder_dim * cfg.predictor_dim * (n - m)
        f += transformer_flops(n, cfg.predictor_dim, cfg.predictor_depth, cfg.mlp_ratio)
    f += 2 * head_dim * cfg.codebook_size * cfg.num_codebooks * m
    return 3.0 * batch * f
