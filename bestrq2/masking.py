"""Random masks by permutation (MAE / I-JEPA style).

A step draws a ratio r ~ U[lo, hi] and masks floor(r * N) tokens at uniformly random
positions. ``shared``: one set of positions for the whole batch (the authors' code);
``per_sample``: independent positions per clip with the same count, so batches stay
rectangular. Randomness comes from torch's generator so a resumed run replays it.
"""
from __future__ import annotations

import torch


def mask_count(num_tokens: int, ratio: float) -> int:
    """floor(r * N), kept in [1, N - 1]: the loss needs one target, the encoder one visible token."""
    if num_tokens < 2:
        raise ValueError(f"masking needs at least 2 tokens, got {num_tokens}")
    return min(max(int(num_tokens * ratio), 1), num_tokens - 1)


def sample_mask(batch: int, num_tokens: int, ratio_range: tuple[float, float] = (0.4, 0.6),
                mode: str = "shared", generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """bool [batch, num_tokens], True = masked."""
    lo, hi = ratio_range
    r = lo + (hi - lo) * torch.rand((), generator=generator).item()
    k = mask_count(num_tokens, r)
    if mode == "shared":
        perm = torch.randperm(num_tokens, generator=generator)
        mask = torch.zeros(num_tokens, dtype=torch.bool)
        mask[perm[:k]] = True
        return mask.expand(batch, num_tokens).clone().to(device)
    if mode == "per_sample":
        order = torch.rand(batch, num_tokens, generator=generator).argsort(dim=1)
        mask = torch.zeros(batch, num_tokens, dtype=torch.bool)
        mask.scatter_(1, order[:, :k], True)
        return mask.to(device)
    raise ValueError(f"mask mode must be 'shared' or 'per_sample', got {mode!r}")


def check_mask(mask: torch.Tensor, batch: int, num_tokens: int) -> torch.Tensor:
    """Accept bool [N] or [B, N]; return bool [B, N] with an equal count >= 1 per row."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError("mask must be a bool tensor (True = masked)")
    if mask.dim() == 1:
        mask = mask.unsqueeze(0).expand(batch, -1)
    if mask.dim() != 2 or mask.shape != (batch, num_tokens):
        raise ValueError(f"mask must have shape [{num_tokens}] or [{batch}, {num_tokens}], got {list(mask.shape)}")
    counts = mask.sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"every clip needs the same number of masked tokens, got {counts.tolist()}")
    if int(counts[0]) < 1 or int(counts[0]) >= num_tokens:
        raise ValueError(f"mask must hide between 1 and N - 1 = {num_tokens - 1} tokens, got {int(counts[0])}")
    return mask


def mask_to_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, N] -> (masked idx [B, M], visible idx [B, N - M]), each ascending.

    A stable argsort of the mask puts visible positions first, then masked, each in order.
    """
    b, n = mask.shape
    m = int(mask[0].sum())
    order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices
    return order[:, n - m:], order[:, : n - m]
