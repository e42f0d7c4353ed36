"""Random-projection quantizer codes: argmax cosine of projected patches over a codebook.

``rpq_codes_ref`` is the plain-PyTorch reference that materialises the [M, K] score matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rpq_codes_ref(patches: torch.Tensor, projection: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch quantizer that materialises the [M, K] score matrix.

    patches [..., 256] float; projection [C, 256, d]; codebooks [C, K, d] unit rows
    -> int64 codes [..., C]. Computed in float32; ties resolve to the lowest index (torch.argmax).
    """
    return rpq_scores_ref(patches, projection, codebooks).argmax(dim=-1)


def rpq_scores_ref(patches: torch.Tensor, projection: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Cosine of every patch with every code: [..., C, K] float32."""
    x = patches.float()
    proj = torch.einsum("...i,cid->...cd", x, projection.float())
    proj = F.normalize(proj, dim=-1)
    return torch.einsum("...cd,ckd->...ck", proj, codebooks.float())
