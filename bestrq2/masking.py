"""Random masks by permutation (MAE / I-JEPA style).

A step draws a ratio r ~ U[lo, hi] and masks floor(r * N) tokens at uniformly random
positions. ``shared``: one set of positions for the whole batch (the authors' code);
``per_sample``: independent positions per clip with the same count, so batches stay
rectangular. Randomness comes from torch's generator so a resumed run replays it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


def mask_count(num_tokens: int, ratio: float) -> int:
    """floor(r * N), kept in [1, N - 1]: the loss needs one target, the encoder one visible token."""
    if num_tokens < 2:
        raise ValueError(f"masking needs at least 2 tokens, got {num_tokens}")
    return min(max(int(num_tokens * ratio), 1), num_tokens - 1)


def sample_mask(batch: int, num_tokens: int, ratio_range: tuple[float, float] = (0.4, 0.6),
                mode: str = "shared", generator: torch.Generator | None = None,
                device: torch.device | str = "cpu", equal_counts: bool = True) -> torch.Tensor:
    """bool [batch, num_tokens], True = masked. ``equal_counts=False`` (per_sample only): every clip
    draws its own ratio, so counts differ (a ragged batch)."""
    lo, hi = ratio_range
    if mode == "per_sample" and not equal_counts:
        r = lo + (hi - lo) * torch.rand(batch, generator=generator)
        k = torch.tensor([mask_count(num_tokens, float(x)) for x in r])
        order = torch.rand(batch, num_tokens, generator=generator).argsort(dim=1)
        rank = order.argsort(dim=1)  # rank[b, n]: where token n falls in clip b's random order
        return (rank < k[:, None]).to(device)
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


def check_mask(mask: torch.Tensor, batch: int, num_tokens: int, equal_counts: bool = True) -> torch.Tensor:
    """Accept bool [N] or [B, N]; return bool [B, N] with a count in [1, N - 1] per row (equal across
    rows unless ``equal_counts`` is False)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError("mask must be a bool tensor (True = masked)")
    if mask.dim() == 1:
        mask = mask.unsqueeze(0).expand(batch, -1)
    if mask.dim() != 2 or mask.shape != (batch, num_tokens):
        raise ValueError(f"mask must have shape [{num_tokens}] or [{batch}, {num_tokens}], got {list(mask.shape)}")
    counts = mask.sum(dim=1)
    if equal_counts and bool((counts != counts[0]).any()):
        raise ValueError(f"every clip needs the same number of masked tokens, got {counts.tolist()} "
                         "(set mask_equal_counts=False with mask_mode='per_sample' for ragged masks)")
    if bool((counts < 1).any()) or bool((counts >= num_tokens).any()):
        raise ValueError(f"mask must hide between 1 and N - 1 = {num_tokens - 1} tokens per clip, "
                         f"got {counts.tolist()}")
    return mask


def mask_to_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, N] with equal counts -> (masked idx [B, M], visible idx [B, N - M]), each ascending.

    A stable argsort of the mask puts visible positions first, then masked, each in order.
    """
    b, n = mask.shape
    m = int(mask[0].sum())
    order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices
    return order[:, n - m:], order[:, : n - m]


def ragged_indices(mask: torch.Tensor):
    """bool [B, N] with unequal counts -> padded index sets.

    Returns (mask_idx [B, M_max], mask_valid [B, M_max], keep_idx [B, V_max], keep_pad [B, V_max],
    rest [B, N - V_max]). Row b's real masked (visible) tokens come first, ascending; the tail of a
    shorter row is filled with other tokens of that row (so indices stay unique) flagged invalid/pad.
    """
    n = mask.shape[1]
    counts = mask.sum(1)
    m_max, v_max = int(counts.max()), int(n - counts.min())
    keep_order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices  # visible first
    mask_order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # masked first
    mask_idx, keep_idx = mask_order[:, :m_max], keep_order[:, :v_max]
    return (mask_idx, torch.gather(mask, 1, mask_idx), keep_idx, torch.gather(mask, 1, keep_idx),
            keep_order[:, v_max:])


@dataclass
class MaskPlan:
    """Where a batch's masked and visible tokens are, as index tensors.

    mask bool [B, N] (True = masked); mask_idx [B, M] and keep_idx [B, V], each ascending per row.
    Ragged batches (unequal counts) pad the rows: ``mask_valid`` [B, M] and ``keep_pad`` [B, V] flag
    the padding, ``rest`` [B, N - V] holds the slots the predictor fills; all three are None otherwise.
    Built on the host from a CPU mask (``from_mask``), then moved with ``to`` (pinned, non-blocking on
    CUDA), so drawing masks never reads the device back.
    """

    mask: torch.Tensor
    mask_idx: torch.Tensor
    keep_idx: torch.Tensor
    mask_valid: torch.Tensor | None = None
    keep_pad: torch.Tensor | None = None
    rest: torch.Tensor | None = None

    @property
    def ragged(self) -> bool:
        return self.keep_pad is not None

    @property
    def fill_idx(self) -> torch.Tensor:
        """The slots the predictor fills with mask tokens: the masked ones (all but the visible, if ragged)."""
        return self.rest if self.rest is not None else self.mask_idx

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "MaskPlan":
        """bool [B, N] (checked: ``check_mask``) -> the index sets."""
        counts = mask.sum(1)
        if bool((counts != counts[0]).any()):
            mask_idx, mask_valid, keep_idx, keep_pad, rest = ragged_indices(mask)
            return cls(mask, mask_idx, keep_idx, mask_valid, keep_pad, rest)
        mask_idx, keep_idx = mask_to_indices(mask)
        return cls(mask, mask_idx, keep_idx)

    def to(self, device: torch.device | str) -> "MaskPlan":
        """The index sets on ``device`` (on CUDA copied beside the compute stream: ``copy_to_device``)."""
        from .inputs import copy_to_device

        return MaskPlan(*copy_to_device([getattr(self, f.name) for f in dataclasses.fields(self)], device))
