"""Residual add (drop-path scale folded in) and the LayerNorm after it, one pass forward, one backward.

``add_layer_norm(x, branch, row_scale, weight, bias, eps=1e-5, out_dtype=None, branch_bias=None) -> (s, y)``

- x, branch [..., D]: the residual stream and a branch's output; row_scale float32 [S], S dividing the rows,
  or None (no drop path): row r takes row_scale[r // (rows / S)], so [rows] is a factor per token and [B] one
  per clip of a [B, L, D] x (the drop-path factors, 0 or 1 / keep, without repeating them L times first).
- s = x + branch * row_scale (x + branch without it), in x's dtype promoted with branch's, as the residual
  add gives; y = LayerNorm(s) with float32 statistics, in ``out_dtype`` (default: the autocast dtype when
  autocast is on, else s's dtype), as ``layer_norm`` gives.
- branch_bias [D] (optional): the bias of the linear that made ``branch``, left out of that linear and
  added here in float32, s = x + (branch + branch_bias) * row_scale. Its gradient, the column sum of
  grad_branch, comes from the backward's row blocks: the linear's backward would otherwise read its whole
  output gradient again for it (the model's attention and MLP output projections: ~1 GB at 256 clips).
- Backward, given grad_s (the residual stream's gradient from further down, or none) and grad_y:
  g = grad_s + LayerNorm's dx(grad_y); grad_x = g, grad_branch = g * row_scale, grad_branch_bias = the
  column sum of grad_branch (float32). The residual stream's gradient is accumulated inside the LayerNorm
  backward: unfused, autograd adds the two float32 gradients of s in a pass of its own at every residual
  junction (32 of them per ViT-B + predictor step, 6.5 GB at 256 clips, ``bench/step_inventory``).

Bytes per element (x float32, branch and y bf16): forward reads 6 and writes 6 (unfused, the add and the
LayerNorm: read 10, write 6); backward reads 10 (grad_y, s, grad_s) and writes 6 (unfused: LayerNorm
backward, the gradient add and the drop-path scale read 18, write 10).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._dispatch import cdiv, check_tensor, interpreting, same_device, use_triton
from ._op import triton_op
from .layer_norm import (_blocks, _normalize_rows, _normalize_rows_bwd, _rows_offsets, check_norm_inputs,
                         compute_dtype, layer_norm_ref)
from .residual_drop_path import residual_drop_path_ref


def add_layer_norm_ref(x: torch.Tensor, branch: torch.Tensor, row_scale: torch.Tensor | None, weight: torch.Tensor,
                       bias: torch.Tensor, eps: float = 1e-5,
                       out_dtype: torch.dtype | None = None,
                       branch_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: the residual add (``residual_drop_path_ref`` with a scale), then ``layer_norm_ref``;
    a ``branch_bias`` is added to the branch in float32 first (s keeps x's dtype promoted with branch's)."""
    out_dtype = out_dtype or compute_dtype(x)
    s_dtype = torch.promote_types(x.dtype, branch.dtype)
    if branch_bias is not None:
        branch = branch.float() + branch_bias.float()
    if row_scale is None:
        s = x + branch
    else:
        d = x.shape[-1]
        rows = x.numel() // d
        if row_scale.shape[0] != rows:  # one factor per block of rows / S consecutive rows
            row_scale = row_scale.repeat_interleave(rows // row_scale.shape[0])
        s = residual_drop_path_ref(x.reshape(-1, d), branch.reshape(-1, d), row_scale).view(x.shape)
    s = s.to(s_dtype)
    return s, layer_norm_ref(s, weight, bias, eps, out_dtype)


@triton.jit
def _add_layer_norm_fwd_kernel(x_ptr, br_ptr, bb_ptr, scale_ptr, w_ptr, b_ptr, s_ptr, y_ptr, mean_ptr, rstd_ptr, R, D,
                               eps, ROWS_PER_SCALE, HAS_BB: tl.constexpr, HAS_SCALE: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, cols, rmask, cmask, mask, off = _rows_offsets(R, D, BLOCK_R, BLOCK_D)
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    br = tl.load(br_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_BB:  # the branch's linear bias, added in float32
        br += tl.load(bb_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        br = br * tl.load(scale_ptr + rows // ROWS_PER_SCALE, mask=rmask, other=0.0)[:, None]
    s = (x + br).to(s_ptr.dtype.element_ty)
    tl.store(s_ptr + off, s, mask=mask)
    # the statistics of s as stored (a no-op for float32 s)
    _normalize_rows(s.to(tl.float32), rows, cols, rmask, cmask, mask, off, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
                    D, eps)


@triton.jit
def _add_layer_norm_bwd_kernel(dy_ptr, s_ptr, w_ptr, mean_ptr, rstd_ptr, ds_ptr, scale_ptr, dx_ptr, dbr_ptr,
                               part_ptr, R, D, ROWS_PER_SCALE, HAS_DS: tl.constexpr, HAS_SCALE: tl.constexpr,
                               HAS_BB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """part_ptr: float32 [2 or 3, programs, D], this row block's partial sums of grad_weight, grad_bias and
    (HAS_BB) grad_branch_bias, one buffer (one reduction after, one pointer: no two arguments into one tensor)."""
    rows, cols, rmask, cmask, mask, off = _rows_offsets(R, D, BLOCK_R, BLOCK_D)
    s = tl.load(s_ptr + off, mask=mask, other=0.0).to(tl.float32)
    stride = tl.num_programs(0) * D
    g = _normalize_rows_bwd(s, rows, cols, rmask, cmask, mask, off, dy_ptr, w_ptr, mean_ptr, rstd_ptr, part_ptr,
                            part_ptr + stride, D)
    if HAS_DS:  # the residual stream's own gradient, accumulated here instead of by a separate add
        g += tl.load(ds_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + off, g.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr + rows // ROWS_PER_SCALE, mask=rmask, other=0.0)[:, None]
    tl.store(dbr_ptr + off, g.to(dbr_ptr.dtype.element_ty), mask=mask)
    if HAS_BB:  # this row block's share of the branch bias's gradient (padding rows hold zeros)
        tl.store(part_ptr + 2 * stride + tl.program_id(0) * D + cols, tl.sum(g, axis=0), mask=cmask)


def _warps() -> dict:
    """8 warps: a program holds 8 rows of 1,024 padded columns; at 4 warps the backward (s, grad_y,
    grad_s and x-hat live at once) spilled 32-56 B a thread on sm_90 (``bench.gpu_compile``)."""
    return {} if interpreting() else {"num_warps": 8}


def _rows_per_scale(rows: int, row_scale: torch.Tensor | None) -> int:
    """Consecutive rows that share one factor of ``row_scale`` [S] (1 without it)."""
    return 1 if row_scale is None else rows // row_scale.shape[0]


@triton_op("bestrq2::add_layer_norm_fwd", mutates_args={})
def _add_layer_norm_fwd(x: torch.Tensor, branch: torch.Tensor, row_scale: torch.Tensor | None, weight: torch.Tensor,
                        bias: torch.Tensor, eps: float, out_dtype: torch.dtype,
                        branch_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r, d = x.shape
    s = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, branch.dtype), device=x.device)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(r, dtype=torch.float32, device=x.device)
    rstd = torch.empty(r, dtype=torch.float32, device=x.device)
    br, bd = _blocks(d)
    wrap_triton(_add_layer_norm_fwd_kernel)[(cdiv(r, br),)](
        x, branch, branch_bias if branch_bias is not None else weight, row_scale if row_scale is not None else x,
        weight, bias, s, y, mean, rstd, r, d, eps, _rows_per_scale(r, row_scale), HAS_BB=branch_bias is not None,
        HAS_SCALE=row_scale is not None, BLOCK_R=br, BLOCK_D=bd, **_warps())
    return s, y, mean, rstd


@_add_layer_norm_fwd.register_fake
def _add_layer_norm_fwd_fake(x, branch, row_scale, weight, bias, eps, out_dtype, branch_bias):
    r = x.shape[0]
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, branch.dtype)),
            x.new_empty(x.shape, dtype=out_dtype), x.new_empty(r, dtype=torch.float32),
            x.new_empty(r, dtype=torch.float32))


@triton_op("bestrq2::add_layer_norm_bwd", mutates_args={})
def _add_layer_norm_bwd(dy: torch.Tensor, ds: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor,
                        mean: torch.Tensor, rstd: torch.Tensor, row_scale: torch.Tensor | None, x_dtype: torch.dtype,
                        branch_dtype: torch.dtype, with_branch_bias: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dbr, float32 [2 or 3, D]: the weight's, the bias's and, with ``with_branch_bias``, the branch bias's
    gradient). The row blocks' partial sums of all three sit in one buffer, summed in one reduction: one
    launch where three were (64 fewer a ViT-B + predictor step)."""
    r, d = s.shape
    br, bd = _blocks(d)
    blocks = cdiv(r, br)
    dx = torch.empty(s.shape, dtype=x_dtype, device=s.device)
    dbr = torch.empty(s.shape, dtype=branch_dtype, device=s.device)
    parts = torch.empty(3 if with_branch_bias else 2, blocks, d, dtype=torch.float32, device=s.device)
    wrap_triton(_add_layer_norm_bwd_kernel)[(blocks,)](
        dy, s, weight, mean, rstd, ds if ds is not None else dy, row_scale if row_scale is not None else mean,
        dx, dbr, parts, r, d, _rows_per_scale(r, row_scale), HAS_DS=ds is not None,
        HAS_SCALE=row_scale is not None, HAS_BB=with_branch_bias, BLOCK_R=br, BLOCK_D=bd, **_warps())
    return dx, dbr, parts.sum(1)


@_add_layer_norm_bwd.register_fake
def _add_layer_norm_bwd_fake(dy, ds, s, weight, mean, rstd, row_scale, x_dtype, branch_dtype, with_branch_bias):
    return (s.new_empty(s.shape, dtype=x_dtype), s.new_empty(s.shape, dtype=branch_dtype),
            weight.new_empty(3 if with_branch_bias else 2, weight.shape[0], dtype=torch.float32))


def _setup(ctx, inputs, output):
    x, branch, row_scale, weight, _, _, _, branch_bias = inputs
    s, _, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd, row_scale)
    ctx.dtypes = (x.dtype, branch.dtype)
    ctx.bb_dtype = None if branch_bias is None else branch_bias.dtype
    # mean / rstd are never differentiated, and a stack's last s is unused: their gradients arrive as None
    # instead of zero tensors autograd would write (89 fill launches a ViT-B step, two of them of s's size)
    ctx.set_materialize_grads(False)


def _backward(ctx, ds, dy, _dmean, _drstd):
    s, weight, mean, rstd, row_scale = ctx.saved_tensors
    if dy is None and ds is None:
        return (None,) * 8
    if dy is None:  # (y unused: never in the model)
        dy = torch.zeros(s.shape, dtype=s.dtype, device=s.device)
    dx, dbr, sums = _add_layer_norm_bwd(dy.contiguous(), None if ds is None else ds.contiguous(), s, weight,
                                        mean, rstd, row_scale, *ctx.dtypes, ctx.bb_dtype is not None)
    dw, db = sums[0].to(weight.dtype), sums[1].to(weight.dtype)
    return dx, dbr, None, dw, db, None, None, None if ctx.bb_dtype is None else sums[2].to(ctx.bb_dtype)


_add_layer_norm_fwd.register_autograd(_backward, setup_context=_setup)


def add_layer_norm(x: torch.Tensor, branch: torch.Tensor, row_scale: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float = 1e-5, out_dtype: torch.dtype | None = None,
                   impl: str | None = None, branch_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y), each x's shape; see the module docstring. ``impl`` auto | triton | reference (kernels._dispatch)."""
    d = check_norm_inputs(x, weight, bias, eps)
    check_tensor("branch", branch, dims=tuple(range(1, 9)), floating=True)
    if branch.shape != x.shape:
        raise ValueError(f"branch must match x {list(x.shape)}, got {list(branch.shape)}")
    if row_scale is not None:
        check_tensor("row_scale", row_scale, dims=(1,), floating=True)
        rows = x.numel() // d
        if not (1 <= row_scale.shape[0] <= rows and rows % row_scale.shape[0] == 0):
            raise ValueError(f"row_scale must be [S] with S dividing the rows ({rows}; [rows]: one factor a row, "
                             f"[B]: one a clip), got {list(row_scale.shape)}")
    if branch_bias is not None:
        check_tensor("branch_bias", branch_bias, dims=(1,), floating=True)
        if branch_bias.shape != (d,):
            raise ValueError(f"branch_bias must be [D] = [{d}], got {list(branch_bias.shape)}")
    same_device(x=x, branch=branch, row_scale=row_scale, weight=weight, bias=bias, branch_bias=branch_bias)
    out_dtype = out_dtype or compute_dtype(x)
    if not use_triton(x, branch, weight, bias, impl=impl):
        return add_layer_norm_ref(x, branch, row_scale, weight, bias, eps, out_dtype, branch_bias)
    if not (d <= 16384):
        raise ValueError(f"the Triton add + layer norm holds a row in registers: D <= 16384, got {d}")
    s, y, _, _ = _add_layer_norm_fwd(x.reshape(-1, d).contiguous(), branch.reshape(-1, d).contiguous(),
                                     None if row_scale is None else row_scale.float().contiguous(),
                                     weight.contiguous(), bias.contiguous(), float(eps), out_dtype,
                                     None if branch_bias is None else branch_bias.contiguous())
    return s.view(x.shape), y.view(x.shape)
