"""Uncertainty of accuracies: bootstrap intervals over test clips, paired differences, seed spread.

A score is a mean of per-clip hits (1 = right). Its 95% interval resamples the test clips with
replacement (percentile bootstrap, ``n_boot`` replicates, seeded: reruns repeat). A suite score is the
test-size-weighted mean over tasks; its interval resamples each task's clips independently. A paired
comparison of two encoders (or probes) uses the same resample for both, so clip difficulty cancels.
"""
from __future__ import annotations

import statistics

import torch

N_BOOT = 2000


def _resample(n: int, n_boot: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, n, (n_boot, n), generator=g)


def suite_bootstrap(hits: list[torch.Tensor], n_boot: int = N_BOOT, seed: int = 0) -> torch.Tensor:
    """hits: per task a float [n_t] (or [k, n_t]: k paired scorers, same clips) -> [n_boot] (or
    [n_boot, k]) test-size-weighted accuracies over resampled clips."""
    g = torch.Generator().manual_seed(seed)
    total = sum(h.shape[-1] for h in hits)
    out = None
    for h in hits:
        h = h.double()
        idx = _resample(h.shape[-1], n_boot, g)
        acc = h[..., idx].mean(-1)  # [n_boot] or [k, n_boot]
        part = acc * (h.shape[-1] / total)
        out = part if out is None else out + part
    return out.T if out.dim() == 2 else out


def interval(samples: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    lo, hi = torch.quantile(samples.double(), torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


def accuracy_ci(hits: list[torch.Tensor], n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float, float]:
    """(weighted accuracy, 95% low, 95% high) of one scorer over one or more tasks."""
    total = sum(h.numel() for h in hits)
    acc = sum(float(h.double().sum()) for h in hits) / total
    return (acc, *interval(suite_bootstrap(hits, n_boot, seed)))


def paired_difference(hits_a: list[torch.Tensor], hits_b: list[torch.Tensor], n_boot: int = N_BOOT,
                      seed: int = 0) -> tuple[float, float, float]:
    """(accuracy of A - accuracy of B, 95% interval) over the same test clips, resampled together."""
    for a, b in zip(hits_a, hits_b):
        if a.shape != b.shape:
            raise ValueError(f"paired scores need the same clips, got {list(a.shape)} and {list(b.shape)}")
    boot = suite_bootstrap([torch.stack([a, b]) for a, b in zip(hits_a, hits_b)], n_boot, seed)
    total = sum(a.numel() for a in hits_a)
    diff = sum(float(a.double().sum() - b.double().sum()) for a, b in zip(hits_a, hits_b)) / total
    return (diff, *interval(boot[:, 0] - boot[:, 1]))


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def rounded(obj, digits: int = 4):
    """JSON-ready copy with floats rounded (no float32 noise such as 0.10000000149011612)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj
