"""Masked-token gather: pick each clip's tokens and add their positions in one pass.

``gather_tokens(x, idx, pos=None) -> [B, M, D]``, out[b, i] = x[b, idx[b, i]] + pos[idx[b, i]].

- x [B, N, D] float; idx int [B, M], unique within a row (a mask's visible or masked positions);
  pos [N, D] or None. The output dtype is x's promoted with pos's, as ``x + pos`` would give.
- Backward (grad to x and pos) is deterministic without float atomics: an inverse map
  inv[b, n] = i (or -1) turns the scatter into a gather, and grad_pos[n] sums over b in order
  (skipped when pos does not require grad, as the model's constant sincos table).
  Every element of grad_x is written once (zeros where a token was not picked).

Bytes moved: forward reads B M D (x) + B M D (pos rows) and writes B M D; backward reads B M D
and writes B N D (+ N D).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._dispatch import (batch_sum_grid, cdiv, check_tensor, checking,
                        inverse_index, same_device, token_blocks, use_triton)
from ._op import triton_op


def gather_tokens_ref(x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch: torch.gather plus an indexed position add."""
    out = torch.gather(x, 1, idx.long()[..., None].expand(-1, -1, x.shape[-1]))
    return out if pos is None else out + pos[idx.long()]


@triton.jit
def _gather_tokens_fwd_kernel(x_ptr, idx_ptr, pos_ptr, out_ptr, R, M, N, D,
                              HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # flat (b, i)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < R
    mask = rmask[:, None] & (d < D)[None, :]
    b = (rows // M).to(tl.int64)
    n = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
    v = tl.load(x_ptr + (b * N + n)[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_POS:
        v += tl.load(pos_ptr + n[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + d[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_tokens_bwd_kernel(gout_ptr, inv_ptr, gx_ptr, gpos_ptr, B, M, N, D, B_PER,
                              HAS_POS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    chunk = tl.program_id(2)  # clips [chunk * B_PER, (chunk + 1) * B_PER); its partial grad_pos sum
    nmask = n < N
    mask = nmask[:, None] & (d < D)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for b in range(chunk * B_PER, tl.minimum(B, (chunk + 1) * B_PER)):  # fixed order: deterministic sums
        i = tl.load(inv_ptr + b * N + n, mask=nmask, other=-1).to(tl.int64)
        picked = i >= 0
        g = tl.load(gout_ptr + (b * M + i)[:, None] * D + d[None, :], mask=mask & picked[:, None], other=0.0)
        g = g.to(tl.float32)
        tl.store(gx_ptr + (b * N + n.to(tl.int64))[:, None] * D + d[None, :], g.to(gx_ptr.dtype.element_ty), mask=mask)
        acc += g
    if HAS_POS:
        tl.store(gpos_ptr + (chunk * N + n.to(tl.int64))[:, None] * D + d[None, :], acc, mask=mask)


@triton_op("bestrq2::gather_tokens_fwd", mutates_args={})
def _gather_fwd(x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    b, n, d = x.shape
    m = idx.shape[1]
    dtype = x.dtype if pos is None else torch.promote_types(x.dtype, pos.dtype)
    out = torch.empty(b, m, d, dtype=dtype, device=x.device)
    br, bd = token_blocks(b * m, d)
    wrap_triton(_gather_tokens_fwd_kernel)[(cdiv(b * m, br), cdiv(d, bd))](
        x, idx, pos if pos is not None else x, out, b * m, m, n, d,
        HAS_POS=pos is not None, BLOCK_R=br, BLOCK_D=bd)
    return out


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The forward kernel alone, no checks, no position: scatter_tokens' backward takes grad_ctx with it."""
    return _gather_fwd(x, idx, None)


@triton_op("bestrq2::gather_tokens_bwd", mutates_args={})
def _gather_bwd(grad: torch.Tensor, inv: torch.Tensor, x_dtype: torch.dtype, pos_dtype: torch.dtype | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    b, m, d = grad.shape
    n = inv.shape[1]
    gx = torch.empty(b, n, d, dtype=x_dtype, device=grad.device)
    bn, bd, tiles, b_per, chunks = batch_sum_grid(n, d, b, grad.device)
    partial = torch.empty(chunks if pos_dtype is not None else 0, n, d, dtype=torch.float32, device=grad.device)
    wrap_triton(_gather_tokens_bwd_kernel)[(*tiles, chunks)](
        grad, inv, gx, partial, b, m, n, d, b_per, HAS_POS=pos_dtype is not None, BLOCK_N=bn, BLOCK_D=bd)
    gpos = partial.sum(0).to(pos_dtype) if pos_dtype is not None else grad.new_empty(0, d, dtype=torch.float32)
    return gx, gpos


def _setup(ctx, inputs, output):
    x, idx, pos = inputs
    ctx.save_for_backward(idx)
    ctx.n, ctx.x_dtype = x.shape[1], x.dtype
    # a constant position table (the model's sincos rows) needs no gradient: skip its batch sum
    ctx.pos_dtype = None if pos is None or not pos.requires_grad else pos.dtype


def _backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    inv = inverse_index(idx, ctx.n)
    gx, gpos = _gather_bwd(grad.contiguous(), inv, ctx.x_dtype, ctx.pos_dtype)
    return gx, None, (gpos if ctx.pos_dtype is not None else None)


@_gather_fwd.register_fake
def _gather_fwd_fake(x, idx, pos):  # shapes only: tracing never launches a kernel (also under the interpreter)
    dtype = x.dtype if pos is None else torch.promote_types(x.dtype, pos.dtype)
    return x.new_empty(x.shape[0], idx.shape[1], x.shape[2], dtype=dtype)


@_gather_bwd.register_fake
def _gather_bwd_fake(grad, inv, x_dtype, pos_dtype):
    b, m, d = grad.shape
    n = inv.shape[1]
    return (grad.new_empty(b, n, d, dtype=x_dtype),
            grad.new_empty(n if pos_dtype is not None else 0, d, dtype=pos_dtype or torch.float32))


_gather_fwd.register_autograd(_backward, setup_context=_setup)


def check_unique_rows(name: str, idx: torch.Tensor, n: int) -> None:
    """Values in [0, n) and no repeats within a row (when ``checking``: see kernels._dispatch)."""
    if not checking(idx) or idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if not (lo >= 0 and hi < n):
        raise ValueError(f"{name} values must lie in [0, {n}), got [{lo}, {hi}]")
    s = idx.sort(dim=1).values
    if bool((s[:, 1:] == s[:, :-1]).any()):
        raise ValueError(f"{name} repeats a token within a row; indices must be unique")


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor | None = None,
                  impl: str | None = None) -> torch.Tensor:
    """[B, M, D] = x[b, idx[b]] + pos[idx[b]]; ``impl`` auto | triton | reference (kernels._dispatch)."""
    check_tensor("x", x, dims=(3,), floating=True)
    check_tensor("idx", idx, dims=(2,), integer=True)
    if idx.shape[0] != x.shape[0]:
        raise ValueError(f"idx must be [B, M] with B = {x.shape[0]}, got {list(idx.shape)}")
    if pos is not None:
        check_tensor("pos", pos, dims=(2,), floating=True)
        if pos.shape != (x.shape[1], x.shape[2]):
            raise ValueError(f"pos must be [N, D] = {[x.shape[1], x.shape[2]]}, got {list(pos.shape)}")
    same_device(x=x, idx=idx, pos=pos)
    check_unique_rows("idx", idx, x.shape[1])
    if not use_triton(x, impl=impl):
        return gather_tokens_ref(x, idx, pos)
    return _gather_fwd(x.contiguous(), idx.contiguous(), None if pos is None else pos.contiguous())
