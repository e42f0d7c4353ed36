"""The predictor's input in one pass: context tokens at their slots, mask token + position elsewhere.

``scatter_tokens(ctx, ctx_idx, fill, fill_idx, fill_pos) -> [B, N, D]``
out[b, ctx_idx[b, i]] = ctx[b, i]; out[b, fill_idx[b, j]] = fill + fill_pos[fill_idx[b, j]].

- ctx [B, M, D]; ctx_idx int [B, M]; fill [D] (the mask token); fill_idx int [B, N - M];
  fill_pos [N, D]. Each row of cat(ctx_idx, fill_idx) must be a permutation of 0..N-1.
- Forward writes every output element once through an inverse map (no zero fill, no atomics).
- Backward: grad_ctx is a gather of the output grad; grad_fill_pos[n] sums the fill slots over b
  in a fixed order; grad_fill = grad_fill_pos summed over n. Deterministic, float32 accumulation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._dispatch import (batch_sum_grid, cdiv, check_tensor, checking,
                        inverse_index, same_device, token_blocks, use_triton)
from ._op import triton_op
from .gather_tokens import gather_rows


def scatter_tokens_ref(ctx: torch.Tensor, ctx_idx: torch.Tensor, fill: torch.Tensor, fill_idx: torch.Tensor,
                       fill_pos: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: two scatters into a zero tensor."""
    b, m, d = ctx.shape
    n = m + fill_idx.shape[1]
    fills = fill + fill_pos[fill_idx.long()]  # [B, N - M, D]
    dtype = torch.promote_types(ctx.dtype, fills.dtype)
    out = torch.zeros(b, n, d, dtype=dtype, device=ctx.device)
    out = out.scatter(1, ctx_idx.long()[..., None].expand(-1, -1, d), ctx.to(dtype))
    return out.scatter(1, fill_idx.long()[..., None].expand(-1, -1, d), fills.to(dtype))


@triton.jit
def _scatter_tokens_fwd_kernel(ctx_ptr, inv_ptr, fill_ptr, pos_ptr, out_ptr, R, M, N, D,
                               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # flat (b, n)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < R
    dmask = d < D
    mask = rmask[:, None] & dmask[None, :]
    b = (rows // N).to(tl.int64)
    n = (rows % N).to(tl.int64)
    i = tl.load(inv_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    is_ctx = i >= 0
    c = tl.load(ctx_ptr + (b * M + i)[:, None] * D + d[None, :], mask=mask & is_ctx[:, None], other=0.0)
    f = tl.load(fill_ptr + d, mask=dmask, other=0.0).to(tl.float32)[None, :] + \
        tl.load(pos_ptr + n[:, None] * D + d[None, :], mask=mask & ~is_ctx[:, None], other=0.0).to(tl.float32)
    v = tl.where(is_ctx[:, None], c.to(tl.float32), f)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + d[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scatter_tokens_bwd_pos_kernel(gout_ptr, inv_ptr, gpos_ptr, B, N, D, B_PER,
                                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    chunk = tl.program_id(2)  # clips [chunk * B_PER, (chunk + 1) * B_PER): one partial sum
    nmask = n < N
    mask = nmask[:, None] & (d < D)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for b in range(chunk * B_PER, tl.minimum(B, (chunk + 1) * B_PER)):
        i = tl.load(inv_ptr + b * N + n, mask=nmask, other=0)
        is_fill = i < 0
        g = tl.load(gout_ptr + (b * N + n.to(tl.int64))[:, None] * D + d[None, :], mask=mask & is_fill[:, None], other=0.0)
        acc += g.to(tl.float32)
    tl.store(gpos_ptr + (chunk * N + n.to(tl.int64))[:, None] * D + d[None, :], acc, mask=mask)


@triton_op("bestrq2::scatter_tokens_fwd", mutates_args={})
def _scatter_fwd(ctx: torch.Tensor, inv: torch.Tensor, fill: torch.Tensor, fill_pos: torch.Tensor) -> torch.Tensor:
    b, m, d = ctx.shape
    n = inv.shape[1]
    dtype = torch.promote_types(ctx.dtype, torch.promote_types(fill.dtype, fill_pos.dtype))
    out = torch.empty(b, n, d, dtype=dtype, device=ctx.device)
    br, bd = token_blocks(b * n, d)
    wrap_triton(_scatter_tokens_fwd_kernel)[(cdiv(b * n, br), cdiv(d, bd))](
        ctx, inv, fill, fill_pos, out, b * n, m, n, d, BLOCK_R=br, BLOCK_D=bd)
    return out


@triton_op("bestrq2::scatter_tokens_bwd_pos", mutates_args={})
def _scatter_bwd_pos(grad: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    b, n, d = grad.shape
    bn, bd, tiles, b_per, chunks = batch_sum_grid(n, d, b, grad.device)
    partial = torch.empty(chunks, n, d, dtype=torch.float32, device=grad.device)
    wrap_triton(_scatter_tokens_bwd_pos_kernel)[(*tiles, chunks)](
        grad, inv, partial, b, n, d, b_per, BLOCK_N=bn, BLOCK_D=bd)
    return partial.sum(0)


def _setup(ctx, inputs, output):
    c, inv, fill, fill_pos = inputs
    ctx.save_for_backward(inv)
    ctx.ctx_dtype, ctx.fill_dtype, ctx.pos_dtype, ctx.m = c.dtype, fill.dtype, fill_pos.dtype, c.shape[1]
    ctx.grads = (fill.requires_grad, fill_pos.requires_grad)


def _backward(ctx, grad):
    (inv,) = ctx.saved_tensors
    grad = grad.contiguous()
    b, n, _ = grad.shape
    # ctx_idx from the inverse map: the slots holding context token i, in order
    ctx_idx = torch.sort(torch.where(inv >= 0, inv, ctx.m), dim=1).indices[:, : ctx.m].to(torch.int32)
    g_ctx = gather_rows(grad, ctx_idx).to(ctx.ctx_dtype)
    fill_grad, pos_grad = ctx.grads
    if not (fill_grad or pos_grad):  # a constant fill and table: only the context's grad
        return g_ctx, None, None, None
    g_pos = _scatter_bwd_pos(grad, inv)
    return (g_ctx, None, g_pos.sum(0).to(ctx.fill_dtype) if fill_grad else None,
            g_pos.to(ctx.pos_dtype) if pos_grad else None)


@_scatter_fwd.register_fake
def _scatter_fwd_fake(ctx, inv, fill, fill_pos):
    dtype = torch.promote_types(ctx.dtype, torch.promote_types(fill.dtype, fill_pos.dtype))
    return ctx.new_empty(ctx.shape[0], inv.shape[1], ctx.shape[2], dtype=dtype)


@_scatter_bwd_pos.register_fake
def _scatter_bwd_pos_fake(grad, inv):
    return grad.new_empty(grad.shape[1], grad.shape[2], dtype=torch.float32)


_scatter_fwd.register_autograd(_backward, setup_context=_setup)


def scatter_tokens(ctx: torch.Tensor, ctx_idx: torch.Tensor, fill: torch.Tensor, fill_idx: torch.Tensor,
                   fill_pos: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """[B, N, D] predictor input; ``impl`` auto | triton | reference (kernels._dispatch)."""
    check_tensor("ctx", ctx, dims=(3,), floating=True)
    check_tensor("ctx_idx", ctx_idx, dims=(2,), integer=True)
    check_tensor("fill", fill, dims=(1,), floating=True)
    check_tensor("fill_idx", fill_idx, dims=(2,), integer=True)
    check_tensor("fill_pos", fill_pos, dims=(2,), floating=True)
    b, m, d = ctx.shape
    n = m + fill_idx.shape[1]
    if ctx_idx.shape != (b, m):
        raise ValueError(f"ctx_idx must be [B, M] = {[b, m]}, got {list(ctx_idx.shape)}")
    if fill_idx.shape[0] != b:
        raise ValueError(f"fill_idx must be [B, N - M] with B = {b}, got {list(fill_idx.shape)}")
    if fill.shape != (d,):
        raise ValueError(f"fill must be [D] = [{d}], got {list(fill.shape)}")
    if fill_pos.shape != (n, d):
        raise ValueError(f"fill_pos must be [N, D] = {[n, d]}, got {list(fill_pos.shape)}")
    same_device(ctx=ctx, ctx_idx=ctx_idx, fill=fill, fill_idx=fill_idx, fill_pos=fill_pos)
    if checking(ctx_idx):
        allidx = torch.cat([ctx_idx.long(), fill_idx.long()], dim=1)
        if allidx.numel():
            lo, hi = int(allidx.min()), int(allidx.max())
            if not (lo >= 0 and hi < n):
                raise ValueError(f"ctx_idx/fill_idx values must lie in [0, {n}), got [{lo}, {hi}]")
        if not bool((allidx.sort(dim=1).values == torch.arange(n, device=allidx.device)).all()):
            raise ValueError("each row of cat(ctx_idx, fill_idx) must be a permutation of 0..N-1")
    if not use_triton(ctx, impl=impl):
        return scatter_tokens_ref(ctx, ctx_idx, fill, fill_idx, fill_pos)
    inv = inverse_index(ctx_idx, n)
    return _scatter_fwd(ctx.contiguous(), inv, fill.contiguous(), fill_pos.contiguous())
