"""Residual add with the drop-path scale folded in, forward and backward.

``residual_drop_path(x, branch, row_scale) -> x + branch * row_scale[:, None]``

- x, branch [R, D] (the block's residual stream and a branch's output, flattened over tokens);
  row_scale float32 [R]: each token's clip factor, 0 (dropped) or 1 / keep (kept) (stochastic
  depth draws one per clip). The output has x's dtype promoted with branch's, as ``x + branch`` gives.
- Backward: grad_x is the output grad itself (no copy); grad_branch = dy * row_scale in one pass.

Unfused (``x + branch * noise / keep``) is two or three passes over [R, D] forward and the same
backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._dispatch import cdiv, check_tensor, interpreting, next_power_of_2, same_device, use_triton
from ._op import triton_op


def residual_drop_path_ref(x: torch.Tensor, branch: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: one addcmul."""
    return torch.addcmul(x, branch, row_scale[:, None].to(torch.promote_types(x.dtype, branch.dtype)))


@triton.jit
def _scale_add_kernel(x_ptr, br_ptr, s_ptr, out_ptr, R, D, HAS_X: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = x + branch * s[row] (HAS_X), or branch * s[row] (the backward's grad_branch)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < R
    mask = rmask[:, None] & (cols < D)[None, :]
    off = rows.to(tl.int64)[:, None] * D + cols[None, :]
    s = tl.load(s_ptr + rows, mask=rmask, other=0.0)
    v = tl.load(br_ptr + off, mask=mask, other=0.0).to(tl.float32) * s[:, None]
    if HAS_X:
        v += tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, v.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, branch, row_scale, out):
    r, d = branch.shape
    br, bd = (256, next_power_of_2(min(d, 4096))) if interpreting() else (16, min(256, next_power_of_2(d)))
    wrap_triton(_scale_add_kernel)[(cdiv(r, br), cdiv(d, bd))](
        x if x is not None else branch, branch, row_scale, out, r, d, HAS_X=x is not None, BLOCK_R=br, BLOCK_D=bd)
    return out


@triton_op("bestrq2::residual_drop_path_fwd", mutates_args={})
def _residual_drop_path_fwd(x: torch.Tensor, branch: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, branch.dtype), device=x.device)
    return _launch(x, branch, row_scale, out)


@_residual_drop_path_fwd.register_fake
def _residual_drop_path_fwd_fake(x, branch, row_scale):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, branch.dtype))


@triton_op("bestrq2::residual_drop_path_bwd", mutates_args={})
def _residual_drop_path_bwd(dy: torch.Tensor, row_scale: torch.Tensor, branch_dtype: torch.dtype) -> torch.Tensor:
    return _launch(None, dy, row_scale, torch.empty(dy.shape, dtype=branch_dtype, device=dy.device))


@_residual_drop_path_bwd.register_fake
def _residual_drop_path_bwd_fake(dy, row_scale, branch_dtype):
    return dy.new_empty(dy.shape, dtype=branch_dtype)


def _setup(ctx, inputs, output):
    x, branch, row_scale = inputs
    ctx.save_for_backward(row_scale)
    ctx.dtypes = (x.dtype, branch.dtype)


def _backward(ctx, dy):
    (row_scale,) = ctx.saved_tensors
    x_dtype, branch_dtype = ctx.dtypes
    dy = dy.contiguous()
    return dy.to(x_dtype), _residual_drop_path_bwd(dy, row_scale, branch_dtype), None


_residual_drop_path_fwd.register_autograd(_backward, setup_context=_setup)


def residual_drop_path(x: torch.Tensor, branch: torch.Tensor, row_scale: torch.Tensor,
                       impl: str | None = None) -> torch.Tensor:
    """x + branch * row_scale[:, None], [R, D]; ``impl`` auto | triton | reference (kernels._dispatch)."""
    check_tensor("x", x, dims=(2,), floating=True)
    check_tensor("branch", branch, dims=(2,), floating=True)
    check_tensor("row_scale", row_scale, dims=(1,), floating=True)
    if branch.shape != x.shape:
        raise ValueError(f"branch must match x {list(x.shape)}, got {list(branch.shape)}")
    if row_scale.shape != (x.shape[0],):
        raise ValueError(f"row_scale must be [R] = [{x.shape[0]}], got {list(row_scale.shape)}")
    same_device(x=x, branch=branch, row_scale=row_scale)
    if not use_triton(x, branch, impl=impl):
        return residual_drop_path_ref(x, branch, row_scale)
    return _residual_drop_path_fwd(x.contiguous(), branch.contiguous(), row_scale.float().contiguous())
