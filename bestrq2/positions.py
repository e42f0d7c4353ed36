"""Fixed 2D sin-cos positions and the two ways of assigning them to tokens.

A token sits at cell (f, t) of an 8 x W grid (token index n = f * W + t). Its sincos row is
``[sin(f w), sin(t w), cos(f w), cos(t w)]`` with ``w_i = 10000^(-i / (D/4))`` (timm's
``build_sincos2d_pos_embed``).

Layouts (``BestRQ2Config.pos_layout``):
- ``grid``: each cell gets its own (f, t) row. Default for models trained here.
- ``official``: the authors' code indexes its 8 x 16 table with the flat index n of the 8 x W
  grid, so on clips shorter than 10 s token n gets the row of cell (n // 16, n % 16). Needs
  N <= 128. Set by ``from_official``. On 10 s clips (W = 16) the two layouts agree.
"""
from __future__ import annotations

import torch

from .config import REFERENCE_TIME_PATCHES


def sincos_2d(f: torch.Tensor, t: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Rows for integer cells (f, t) of any shape S -> float32 [*S, dim]."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    q = dim // 4
    omega = 1.0 / (temperature ** (torch.arange(q, dtype=torch.float32, device=f.device) / q))
    pf = f.to(torch.float32)[..., None] * omega
    pt = t.to(torch.float32)[..., None] * omega
    return torch.cat([torch.sin(pf), torch.sin(pt), torch.cos(pf), torch.cos(pt)], dim=-1)


def sincos_table(height: int, width: int, dim: int) -> torch.Tensor:
    """The full table for an height x width grid, row-major: [height * width, dim]."""
    f, t = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return sincos_2d(f.reshape(-1), t.reshape(-1), dim)


def token_cells(token_idx: torch.Tensor, width: torch.Tensor | int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells (f, t) whose sincos row token index n gets, for a grid of ``width`` time patches.

    ``width`` may be a per-clip tensor broadcastable against ``token_idx`` (ragged batches).
    """
    if layout == "grid":
        return token_idx // width, token_idx % width
    if layout == "official":
        if isinstance(width, int):
            too_big = width > REFERENCE_TIME_PATCHES
        else:
            too_big = bool((width > REFERENCE_TIME_PATCHES).any())
        if too_big:
            raise ValueError("pos_layout='official' covers at most 8 x 16 tokens (10 s); "
                             "cut the audio into <= 10 s chunks or use pos_layout='grid'")
        return token_idx // REFERENCE_TIME_PATCHES, token_idx % REFERENCE_TIME_PATCHES
    raise ValueError(f"unknown pos_layout {layout!r}")


def positions_for(token_idx: torch.Tensor, width: torch.Tensor | int, dim: int, layout: str) -> torch.Tensor:
    """Sincos rows for token indices of any shape S -> [*S, dim]."""
    f, t = token_cells(token_idx, width, layout)
    return sincos_2d(f, t, dim)
