"""LayerNorm with float32 statistics and its output in the compute dtype, forward and backward.

``layer_norm(x, weight, bias, eps=1e-5, out_dtype=None) -> y``

- x [..., D] (any float dtype); weight, bias [D] (the model's float32 parameters).
- y = (x - mean) / sqrt(var + eps) * weight + bias, statistics in float32, y in ``out_dtype``:
  by default the autocast dtype when autocast is on for x's device (so the next matmul reads bf16
  without a cast pass), else x's dtype. ``nn.LayerNorm`` under autocast returns float32 instead,
  and the linear after it pays a separate cast.
- Backward: dx per row from the saved mean and rstd (x is re-read, not a normalised copy);
  grad_weight and grad_bias are summed per row block into float32 partials and added after, in a
  fixed order (deterministic, no atomics).

Bytes per row: forward reads D (x) and writes D (y) + 8; backward reads 2 D (x, dy) + 8 and writes D.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._dispatch import cdiv, check_tensor, interpreting, next_power_of_2, same_device, use_triton
from ._op import triton_op


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What a matmul would run in here: the autocast dtype when autocast is on for x's device."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain PyTorch: F.layer_norm in float32, then a cast."""
    out_dtype = out_dtype or compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return y.to(out_dtype)


@triton.jit
def _rows_offsets(R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's whole rows [BLOCK_R, BLOCK_D]: (rows, cols, row mask, column mask, mask, offsets).
    The caller loads its tile itself: torch.compile's mutation analysis takes a pointer handed to a helper
    whose results address a store for a written one, and copies that input before every launch."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < R
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    off = rows.to(tl.int64)[:, None] * D + cols[None, :]
    return rows, cols, rmask, cmask, mask, off


@triton.jit
def _normalize_rows(x, rows, cols, rmask, cmask, mask, off, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, D, eps):
    """LayerNorm of a float32 row tile (``_rows_offsets``): y stored in y's dtype, mean and rstd stored."""
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _layer_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, R, D, eps,
                           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, cols, rmask, cmask, mask, off = _rows_offsets(R, D, BLOCK_R, BLOCK_D)
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    _normalize_rows(x, rows, cols, rmask, cmask, mask, off, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, D, eps)


@triton.jit
def _normalize_rows_bwd(x, rows, cols, rmask, cmask, mask, off, dy_ptr, w_ptr, mean_ptr, rstd_ptr, dw_ptr, db_ptr, D):
    """LayerNorm's backward for a float32 row tile: returns dx (float32, not stored) and stores this row
    block's share of grad_weight / grad_bias (the blocks are summed after, in order)."""
    pid = tl.program_id(0)
    dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    wdy = w[None, :] * dy
    c1 = tl.sum(xhat * wdy, axis=1) / D
    c2 = tl.sum(wdy, axis=1) / D
    tl.store(dw_ptr + pid * D + cols, tl.sum(dy * xhat, axis=0), mask=cmask)
    tl.store(db_ptr + pid * D + cols, tl.sum(dy, axis=0), mask=cmask)
    return (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]


@triton.jit
def _layer_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, part_ptr, R, D,
                           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """part_ptr: float32 [2, programs, D], this row block's partial sums of grad_weight and grad_bias."""
    rows, cols, rmask, cmask, mask, off = _rows_offsets(R, D, BLOCK_R, BLOCK_D)
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    dx = _normalize_rows_bwd(x, rows, cols, rmask, cmask, mask, off, dy_ptr, w_ptr, mean_ptr, rstd_ptr, part_ptr,
                             part_ptr + tl.num_programs(0) * D, D)
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _blocks(d: int) -> tuple[int, int]:
    """(rows per program, columns padded to a power of two). Several rows a program keep the grid
    small enough that the backward's per-block partials stay a few MB at the paper's shapes."""
    bd = next_power_of_2(d)
    if interpreting():  # each program costs milliseconds under the interpreter: few, big ones
        return max(1, min(256, 16384 // bd)), bd
    return max(1, min(16, 8192 // bd)), bd


@triton_op("bestrq2::layer_norm_fwd", mutates_args={})
def _layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                    out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = x.shape[-1]
    r = x.numel() // d
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(r, dtype=torch.float32, device=x.device)
    rstd = torch.empty(r, dtype=torch.float32, device=x.device)
    br, bd = _blocks(d)
    wrap_triton(_layer_norm_fwd_kernel)[(cdiv(r, br),)](x, weight, bias, y, mean, rstd, r, d, eps,
                                                              BLOCK_R=br, BLOCK_D=bd)
    return y, mean, rstd


@_layer_norm_fwd.register_fake
def _layer_norm_fwd_fake(x, weight, bias, eps, out_dtype):
    r = x.numel() // x.shape[-1]
    return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty(r, dtype=torch.float32),
            x.new_empty(r, dtype=torch.float32))


@triton_op("bestrq2::layer_norm_bwd", mutates_args={})
def _layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                    rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, float32 [2, D]: the weight's and the bias's gradient, their row blocks' partials summed in one
    reduction)."""
    d = x.shape[-1]
    r = x.numel() // d
    br, bd = _blocks(d)
    blocks = cdiv(r, br)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    parts = torch.empty(2, blocks, d, dtype=torch.float32, device=x.device)
    wrap_triton(_layer_norm_bwd_kernel)[(blocks,)](dy, x, weight, mean, rstd, dx, parts, r, d, BLOCK_R=br,
                                                  BLOCK_D=bd)
    return dx, parts.sum(1)


@_layer_norm_bwd.register_fake
def _layer_norm_bwd_fake(dy, x, weight, mean, rstd):
    return x.new_empty(x.shape), weight.new_empty(2, weight.shape[0], dtype=torch.float32)


def _setup(ctx, inputs, output):
    x, weight, _, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    # the statistics / log-sum-exp outputs are never differentiated: their gradients arrive as None instead
    # of zero tensors autograd would write (one fill launch each, every step)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _dmean, _drstd):
    if dy is None:  # y unused
        return None, None, None, None, None
    x, weight, mean, rstd = ctx.saved_tensors
    dx, sums = _layer_norm_bwd(dy.contiguous(), x, weight, mean, rstd)
    return dx, sums[0].to(weight.dtype), sums[1].to(weight.dtype), None, None


_layer_norm_fwd.register_autograd(_backward, setup_context=_setup)


def check_norm_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> int:
    """The checks a LayerNorm's inputs take (here and in ``add_layer_norm``); returns D."""
    check_tensor("x", x, dims=tuple(range(1, 9)), floating=True)
    check_tensor("weight", weight, dims=(1,), floating=True)
    check_tensor("bias", bias, dims=(1,), floating=True)
    d = x.shape[-1]
    if not (weight.shape == (d,) and bias.shape == (d,)):
        raise ValueError(f"weight and bias must be [D] = [{d}], got {list(weight.shape)} and {list(bias.shape)}")
    if not (d >= 1 and x.numel() >= 1):
        raise ValueError(f"x must be non-empty, got shape {list(x.shape)}")
    if not (eps > 0):
        raise ValueError(f"eps must be positive, got {eps}")
    return d


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
               out_dtype: torch.dtype | None = None, impl: str | None = None) -> torch.Tensor:
    """y [..., D] in ``out_dtype`` (default: the autocast dtype, else x's); see the module docstring.
    ``impl`` auto | triton | reference (kernels._dispatch)."""
    d = check_norm_inputs(x, weight, bias, eps)
    same_device(x=x, weight=weight, bias=bias)
    out_dtype = out_dtype or compute_dtype(x)
    if not use_triton(x, weight, bias, impl=impl):
        return layer_norm_ref(x, weight, bias, eps, out_dtype)
    if not (d <= 16384):
        raise ValueError(f"the Triton layer norm holds a row in registers: D <= 16384, got {d}")
    return _layer_norm_fwd(x.contiguous(), weight.contiguous(), bias.contiguous(), float(eps), out_dtype)[0]
