"""Bias add + exact (erf) GELU in one pass, forward and backward.

``bias_gelu(x, bias) -> gelu(x + bias)``

- x [..., H]: the MLP's first matmul without its bias (``F.linear(h, fc1.weight)``); bias [H].
  Computed in float32, stored in x's dtype (bf16 under autocast). GELU is the exact one,
  0.5 z (1 + erf(z / sqrt 2)), as timm's Mlp and the authors' ViT use.
- Backward: dx = dy * gelu'(z) with z recomputed from x and bias (nothing but x saved);
  grad_bias = sum of dx over rows, as float32 partials per row block added after in a fixed order.

Unfused, the same work is three passes forward (bias add, erf, product) and more backward, each
reading and writing the whole [rows, H] activation (H = 3072 at ViT-B).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._dispatch import cdiv, check_tensor, interpreting, next_power_of_2, same_device, use_triton
from ._op import triton_op

def bias_gelu_ref(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: F.gelu(x + bias) in float32, in x's dtype."""
    with torch.autocast(x.device.type, enabled=False):
        return F.gelu(x.float() + bias.float()).to(x.dtype)


@triton.jit
def _tile_offsets(R, H, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's tile: (offsets, mask, cols, column mask). No pointer goes in: torch.compile's mutation
    analysis takes one handed to a helper whose results address a store for written (and copies it)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    mask = (rows < R)[:, None] & cmask[None, :]
    return rows.to(tl.int64)[:, None] * H + cols[None, :], mask, cols, cmask


@triton.jit
def _preactivation(x_ptr, b_ptr, off, mask, cols, cmask):
    """z = x + bias in float32 for the tile at ``off``."""
    z = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    return z + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _bias_gelu_fwd_kernel(x_ptr, b_ptr, y_ptr, R, H, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    off, mask, cols, cmask = _tile_offsets(R, H, BLOCK_R, BLOCK_H)
    z = _preactivation(x_ptr, b_ptr, off, mask, cols, cmask)
    y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(dy_ptr, x_ptr, b_ptr, dx_ptr, db_ptr, R, H, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_r = tl.program_id(0)
    off, mask, cols, cmask = _tile_offsets(R, H, BLOCK_R, BLOCK_H)
    z = _preactivation(x_ptr, b_ptr, off, mask, cols, cmask)
    dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    dx = tl.where(mask, dy * (cdf + z * pdf), 0.0)
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + pid_r * H + cols, tl.sum(dx, axis=0), mask=cmask)


def _blocks(h: int) -> tuple[int, int]:
    if interpreting():  # few, big programs under the interpreter
        return 256, min(4096, next_power_of_2(h))
    return 32, min(256, next_power_of_2(h))


@triton_op("bestrq2::bias_gelu_fwd", mutates_args={})
def _bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1]
    r = x.numel() // h
    y = torch.empty_like(x)
    br, bh = _blocks(h)
    wrap_triton(_bias_gelu_fwd_kernel)[(cdiv(r, br), cdiv(h, bh))](x, bias, y, r, h,
                                                                                 BLOCK_R=br, BLOCK_H=bh)
    return y


@_bias_gelu_fwd.register_fake
def _bias_gelu_fwd_fake(x, bias):
    return torch.empty_like(x)


@triton_op("bestrq2::bias_gelu_bwd", mutates_args={})
def _bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = x.shape[-1]
    r = x.numel() // h
    br, bh = _blocks(h)
    blocks = cdiv(r, br)
    dx = torch.empty_like(x)
    db = torch.empty(blocks, h, dtype=torch.float32, device=x.device)
    wrap_triton(_bias_gelu_bwd_kernel)[(blocks, cdiv(h, bh))](dy, x, bias, dx, db, r, h,
                                                                     BLOCK_R=br, BLOCK_H=bh)
    return dx, db.sum(0).to(bias.dtype)


@_bias_gelu_bwd.register_fake
def _bias_gelu_bwd_fake(dy, x, bias):
    return torch.empty_like(x), torch.empty_like(bias)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    return _bias_gelu_bwd(dy.contiguous(), x, bias)


_bias_gelu_fwd.register_autograd(_backward, setup_context=_setup)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """gelu(x + bias) [..., H] in x's dtype; ``impl`` auto | triton | reference (kernels._dispatch)."""
    check_tensor("x", x, dims=tuple(range(1, 9)), floating=True)
    check_tensor("bias", bias, dims=(1,), floating=True)
    if bias.shape != (x.shape[-1],):
        raise ValueError(f"bias must be [H] = [{x.shape[-1]}], got {list(bias.shape)}")
    if not (x.numel() >= 1):
        raise ValueError(f"x must be non-empty, got shape {list(x.shape)}")
    same_device(x=x, bias=bias)
    if not use_triton(x, bias, impl=impl):
        return bias_gelu_ref(x, bias)
    return _bias_gelu_fwd(x.contiguous(), bias.contiguous())
