"""Frozen random-projection quantizer (the BEST-RQ target generator).

raw patch x [256] -> for each codebook c: code = argmax_k <normalize(x @ P_c), CB_c[k]>.
P_c [256, d] is Xavier-uniform, CB_c [K, d] has standard-normal rows normalised to unit
length; both are frozen buffers. The paper uses one codebook (C = 1, K = 8192, d = 16).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .kernels import rpq_codes, rpq_codes_ref, rpq_scores_ref

__all__ = ["RandomProjectionQuantizer", "rpq_codes_ref", "rpq_scores_ref"]  # the references, re-exported


class RandomProjectionQuantizer(torch.nn.Module):
    """Holds the frozen projection [C, 256, d] and codebooks [C, K, d]; no trainable state.

    ``norm`` (``BestRQ2Config.rpq_norm``): "none" (the paper: raw dB patches), "patch" (each 256-value
    patch standardised), "bin" (the log-mel standardised per mel bin with corpus statistics, the buffers
    ``bin_mean`` / ``bin_std`` [128], estimated once before training and saved in checkpoints;
    ``bin_count`` says how many frames they came from, 0 = not estimated yet). ``impl``: the kernel
    (auto | triton | reference; ``BestRQ2Config.kernels["rpq"]``)."""

    def __init__(self, input_dim: int = 256, codebook_dim: int = 16, codebook_size: int = 8192,
                 num_codebooks: int = 1, seed: int = 0, norm: str = "none", n_mels: int = 128,
                 impl: str = "auto") -> None:
        super().__init__()
        self.norm, self.impl = norm, impl
        if norm == "bin":
            self.register_buffer("bin_mean", torch.zeros(n_mels))
            self.register_buffer("bin_std", torch.ones(n_mels))
            self.register_buffer("bin_count", torch.zeros((), dtype=torch.float64))
        g = torch.Generator().manual_seed(int(seed))
        bound = math.sqrt(6.0 / (input_dim + codebook_dim))  # Xavier uniform, gain 1
        projection = (torch.rand(num_codebooks, input_dim, codebook_dim, generator=g) * 2 - 1) * bound
        codebooks = F.normalize(torch.randn(num_codebooks, codebook_size, codebook_dim, generator=g), dim=-1)
        self.register_buffer("projection", projection)
        self.register_buffer("codebooks", codebooks)

    @property
    def num_codebooks(self) -> int:
        return self.codebooks.shape[0]

    def stats(self) -> dict:
        """Keyword arguments of ``rpq_codes`` for this quantizer's normalisation."""
        if self.norm == "bin":
            if float(self.bin_count) == 0 and not torch.compiler.is_compiling():
                raise ValueError("rpq_norm='bin' needs per-bin statistics: estimate them first "
                                 "(bestrq2.train.estimate_bin_stats, done by pretrain) or load a checkpoint")
            return {"norm": "bin", "bin_mean": self.bin_mean, "bin_std": self.bin_std, "impl": self.impl}
        return {"norm": self.norm, "impl": self.impl}

    @torch.no_grad()
    def set_bin_stats(self, mean: torch.Tensor, std: torch.Tensor, count: int) -> None:
        self.bin_mean.copy_(mean)
        self.bin_std.copy_(std.clamp_min(1e-3))
        self.bin_count.fill_(float(count))

    @torch.no_grad()
    def fit_bin_stats(self, specs) -> int:
        """Per-mel-bin mean and std over log-mels [bins, frames] (an iterable; float64 sums, streamed),
        frozen into this quantizer. Returns the frame count."""
        s = s2 = None
        n = 0
        for spec in specs:
            spec = spec.detach().double().cpu()
            s = spec.sum(1) if s is None else s + spec.sum(1)
            s2 = (spec * spec).sum(1) if s2 is None else s2 + (spec * spec).sum(1)
            n += spec.shape[1]
        if n == 0:
            raise ValueError("fit_bin_stats: no frames")
        mean = s / n
        self.set_bin_stats(mean.float(), (s2 / n - mean * mean).clamp_min(0).sqrt().float(), n)
        return n

    @torch.no_grad()
    def codes(self, spec: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Log-mel [B, F, T] (T a multiple of 16) -> int64 codes [B * (m or N), C]."""
        return rpq_codes(spec, self.projection, self.codebooks, index, **self.stats())

    @torch.no_grad()
    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches [..., 256] -> int64 codes [..., C] (norm "none" or "patch"; "bin" needs the log-mel:
        ``codes``)."""
        lead = patches.shape[:-1]
        flat = patches.reshape(-1, patches.shape[-1])
        return rpq_codes(flat, self.projection, self.codebooks, **self.stats()).reshape(*lead, self.num_codebooks)
