"""Frozen random-projection quantizer (the BEST-RQ target generator).

raw patch x [256] -> for each codebook c: code = argmax_k <normalize(x @ P_c), CB_c[k]>.
P_c [256, d] is Xavier-uniform, CB_c [K, d] has standard-normal rows normalised to unit
length; both are frozen buffers. The paper uses one codebook (C = 1, K = 8192, d = 16).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .kernels import rpq_codes
from .kernels import rpq_codes_ref, rpq_scores_ref

__all__ = ["RandomProjectionQuantizer", "rpq_codes_ref", "rpq_scores_ref"]  # the references, re-exported


class RandomProjectionQuantizer(torch.nn.Module):
    """Holds the frozen projection [C, 256, d] and codebooks [C, K, d]; no trainable state."""

    def __init__(self, input_dim: int = 256, codebook_dim: int = 16, codebook_size: int = 8192,
                 num_codebooks: int = 1, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        bound = math.sqrt(6.0 / (input_dim + codebook_dim))  # Xavier uniform, gain 1
        projection = (torch.rand(num_codebooks, input_dim, codebook_dim, generator=g) * 2 - 1) * bound
        codebooks = F.normalize(torch.randn(num_codebooks, codebook_size, codebook_dim, generator=g), dim=-1)
        self.register_buffer("projection", projection)
        self.register_buffer("codebooks", codebooks)

    @property
    def num_codebooks(self) -> int:
        return self.codebooks.shape[0]

    @torch.no_grad()
    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches [..., 256] -> int64 codes [..., C]."""
        lead = patches.shape[:-1]
        flat = patches.reshape(-1, patches.shape[-1])
        return rpq_codes(flat, self.projection, self.codebooks).reshape(*lead, self.num_codebooks)
