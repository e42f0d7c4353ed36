"""Fused attention for this model's short sequences (N <= 256 tokens), ragged (varlen) form.

``triton_attention(q, k, v, cu_seqlens, max_seqlen) -> o``: q, k, v [T, H, Dh] hold B sequences
packed end to end (sequence b is rows cu_seqlens[b]:cu_seqlens[b+1]); each token attends to the
tokens of its own sequence only, softmax scale Dh^-0.5, no causal mask. A dense batch is the case of
equal lengths. The softmax runs in base 2 (exp2, log2(e) folded into the scale). Forward keeps the
log-sum-exp; the backward computes delta = rowsum(dO * O) in the kernel and recomputes the
probabilities: up to 128 tokens one program holds a whole sequence and one kernel gives dQ, dK and
dV from a single S and dP; longer sequences use FlashAttention-2's split (one kernel for dK/dV, one
for dQ, no atomics). Accumulation in float32; Dh up to 128 (padded to a power of two inside the
kernel).

``triton_qkv_attention(qkv, bias, cu_seqlens, max_seqlen) -> o`` is the same attention on the packed
output of the model's qkv linear, qkv [T, 3, H, Dh] computed *without* its bias, bias [3 H Dh] (or
None): the kernels add the bias to each tile as they load it (in float32), and the backward writes
dQ, dK, dV straight into one [T, 3, H, Dh] gradient and sums the bias gradient from its float32 tiles.
What this saves a training step against ``unbind`` + an attention that returns three gradients: the
``stack`` of those three into qkv's gradient (a read and a write of it) and the linear's separate
bias-gradient pass over it (another read): at ViT-B, 256 clips, 4.85 GB of traffic a step
(``bench.step_inventory``). The key bias is never added: it shifts every score of a query row by the same
q . b_k, which softmax cancels, so the output is the same function and that bias's gradient is exactly
zero (PyTorch's unfused path computes it as rounding noise); skipping it spares each K tile an add.

``attention_ref`` is the float reference (softmax(QK^T) V per sequence); ``qkv_attention_ref`` the
packed one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..env import read
from ._dispatch import cdiv, interpreting, next_power_of_2
from ._op import triton_op
from ._rounding import round_to_bf16_rtne

MAX_SEQLEN = 256
MAX_HEAD_DIM = 128


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-sequence softmax attention, materialising the scores (any dtype; float64 for tests)."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    scale = q.shape[-1] ** -0.5
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))  # [H, L, Dh]
        p = torch.softmax((qs @ ks.transpose(-1, -2)) * scale, dim=-1)
        out[s:e] = (p @ vs).transpose(0, 1)
    return out


def qkv_attention_ref(qkv: torch.Tensor, bias: torch.Tensor | None, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``attention_ref`` of (qkv + bias).unbind(1): qkv [T, 3, H, Dh], bias [3 H Dh] or None."""
    if bias is not None:
        qkv = qkv + bias.view(qkv.shape[1:]).to(qkv.dtype)
    return attention_ref(*qkv.unbind(1), cu_seqlens)


LOG2E = 1.4426950408889634


@triton.jit
def _seq_block(start, seqlen, first, D, BLOCK: tl.constexpr, D_PAD: tl.constexpr):
    """The block of BLOCK tokens from ``first`` of the sequence at rows start:start+seqlen: (positions in the
    sequence, their mask, head-dim offsets and mask, global row indices). The kernels load start and seqlen
    from cu_seqlens themselves: torch.compile's mutation analysis takes a pointer handed to a helper whose
    results address a store for a written one (and copies that input before every launch)."""
    offs = first + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    return offs, offs < seqlen, offs_d, offs_d < D, (start + offs).to(tl.int64)


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, bq_ptr, bv_ptr, o_ptr, lse_ptr, cu_ptr,
                     sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, T, D, qk_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
                     DOT_FP32: tl.constexpr):
    """Online softmax in base 2: qk_scale = Dh^-0.5 * log2(e), so exp2 replaces exp; the stored
    log-sum-exp is in base-2 units too (only the backward reads it)."""
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(cu_ptr + b)
    seqlen = tl.load(cu_ptr + b + 1) - start
    offs_m, mmask, offs_d, dmask, rows = _seq_block(start, seqlen, pid_m * BLOCK_M, D, BLOCK_M, D_PAD)
    if pid_m * BLOCK_M >= seqlen:
        return
    q = _tile(q_ptr, rows, sq_t, h, sq_h, offs_d, mmask, dmask, bq_ptr, D, HAS_BIAS, DOT_FP32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    for n0 in range(0, seqlen, BLOCK_N):
        _first_n, nmask, _offs_n, _dmask_n, cols = _seq_block(start, seqlen, n0, D, BLOCK_N, D_PAD)
        kb = _tile(k_ptr, cols, sk_t, h, sk_h, offs_d, nmask, dmask, k_ptr, D, False, DOT_FP32)
        vb = _tile(v_ptr, cols, sv_t, h, sv_h, offs_d, nmask, dmask, bv_ptr, D, HAS_BIAS, DOT_FP32)
        s = _dot(q, tl.trans(kb), DOT_FP32) * qk_scale
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(vb.dtype), vb, DOT_FP32)
        m_i = m_new
    o = acc / l_i[:, None]
    if o_ptr.dtype.element_ty == tl.bfloat16:
        o = round_to_bf16_rtne(o)
    tl.store(o_ptr + rows[:, None] * so_t + h * so_h + offs_d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=mmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + h * T + rows, m_i + tl.log2(l_i), mask=mmask)


@triton.jit
def _tile(ptr, rows, stride_t, h, stride_h, offs_d, rmask, dmask, b_ptr, D, HAS_BIAS: tl.constexpr,
          DOT_FP32: tl.constexpr):
    """A [rows, D_PAD] tile of one head of a [T, H, Dh] tensor (zeros outside the masks), plus head h's
    bias (b_ptr: [H, Dh]) added in float32 when HAS_BIAS: float32 for the exact path, else rounded to
    the tensor's own (16-bit) dtype for the tensor cores."""
    m = rmask[:, None] & dmask[None, :]
    t = tl.load(ptr + rows[:, None] * stride_t + h * stride_h + offs_d[None, :], mask=m, other=0.0)
    if HAS_BIAS:
        bias = tl.load(b_ptr + h * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
        biased = tl.where(m, t.to(tl.float32) + bias[None, :], 0.0)  # padding rows stay exactly zero
        if DOT_FP32:
            t = biased
        else:
            t = biased.to(t.dtype)
    elif DOT_FP32:
        t = t.to(tl.float32)
    return t


@triton.jit
def _row_stats(lse_ptr, o_ptr, so_t, so_h, do, h, T, rows, offs_d, rmask, dmask):
    """For a tile of query rows: the forward's base-2 log-sum-exp, and delta = rowsum(dO * O) computed
    here from the O tile (no separate pass over O and dO before the backward)."""
    o = tl.load(o_ptr + rows[:, None] * so_t + h * so_h + offs_d[None, :], mask=rmask[:, None] & dmask[None, :],
                other=0.0).to(tl.float32)
    return tl.load(lse_ptr + h * T + rows, mask=rmask, other=0.0), tl.sum(o * do.to(tl.float32), axis=1)


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    """a @ b accumulated in float32: exact float32 products (IEEE) on the fp32/interpreter path;
    16-bit operands on the tensor cores otherwise (b cast to a's dtype), as FlashAttention does."""
    if DOT_FP32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b.to(a.dtype))


@triton.jit
def _probs_and_dscores(q, kb, vb, do, lse, delta, mmask, nmask, qk_scale, DOT_FP32: tl.constexpr):
    """Backward recomputation for a (query tile, key tile): P = exp2(QK^T s log2e - lse2),
    dS = P (dO V^T - delta)."""
    s = _dot(q, tl.trans(kb), DOT_FP32) * qk_scale
    p = tl.where(mmask[:, None] & nmask[None, :], tl.exp2(s - lse[:, None]), 0.0)
    dp = _dot(do, tl.trans(vb), DOT_FP32)
    return p, p * (dp - delta[:, None])


@triton.jit
def _bias_grad(db_ptr, g, slot, b, blk, NBLK, HD, h, D, offs_d, dmask):
    """Column sums of a float32 gradient tile (its rows outside the sequence are exactly zero) into the
    bias-gradient partials [B, NBLK, 3, H, Dh]: sequence b, row block blk, slot (0 q, 1 k, 2 v), head h."""
    tl.store(db_ptr + ((b * NBLK + blk) * 3 + slot) * HD + h * D + offs_d, tl.sum(g, axis=0), mask=dmask)


@triton.jit
def _store3(g_ptr, dq, dk, dv, rows, cols, sg_t, sg_s, sg_h, h, offs_d, mmask, nmask, dmask,
            WITH_DQ: tl.constexpr, WITH_DKDV: tl.constexpr):
    """Into the one gradient tensor [T, 3, H, Dh] (strides sg_t, sg_s, sg_h): dQ at slot 0 of the query
    rows, dK and dV at slots 1 and 2 of the key rows. One tensor, not three pointers to it: under
    torch.compile each pointer a kernel writes through is functionalised as its own copy of the tensor."""
    if WITH_DQ:
        if g_ptr.dtype.element_ty == tl.bfloat16:
            dq = round_to_bf16_rtne(dq)
        tl.store(g_ptr + rows[:, None] * sg_t + h * sg_h + offs_d[None, :], dq.to(g_ptr.dtype.element_ty),
                 mask=mmask[:, None] & dmask[None, :])
    if WITH_DKDV:
        st = cols[:, None] * sg_t + h * sg_h + offs_d[None, :]
        if g_ptr.dtype.element_ty == tl.bfloat16:
            dk = round_to_bf16_rtne(dk)
            dv = round_to_bf16_rtne(dv)
        tl.store(g_ptr + sg_s + st, dk.to(g_ptr.dtype.element_ty), mask=nmask[:, None] & dmask[None, :])
        tl.store(g_ptr + 2 * sg_s + st, dv.to(g_ptr.dtype.element_ty), mask=nmask[:, None] & dmask[None, :])


@triton.jit
def _attn_bwd_one_tile_kernel(q_ptr, k_ptr, v_ptr, bq_ptr, bv_ptr, o_ptr, do_ptr, lse_ptr, g_ptr, db_ptr, cu_ptr,
                              sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, sdo_t, sdo_h, sg_t, sg_s, sg_h,
                              T, D, HD, scale, qk_scale,
                              BLOCK: tl.constexpr, D_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr):
    """The whole backward of one (head, sequence) when the sequence fits one tile (N <= 128): S and
    dP computed once, then dV = P^T dO, dK = dS^T Q, dQ = dS K in the same program (no recompute,
    no atomics, one launch)."""
    h, b = tl.program_id(0), tl.program_id(1)
    start = tl.load(cu_ptr + b)
    seqlen = tl.load(cu_ptr + b + 1) - start
    _, msk, offs_d, dmask, rows = _seq_block(start, seqlen, 0, D, BLOCK, D_PAD)
    q = _tile(q_ptr, rows, sq_t, h, sq_h, offs_d, msk, dmask, bq_ptr, D, HAS_BIAS, DOT_FP32)
    kb = _tile(k_ptr, rows, sk_t, h, sk_h, offs_d, msk, dmask, k_ptr, D, False, DOT_FP32)
    vb = _tile(v_ptr, rows, sv_t, h, sv_h, offs_d, msk, dmask, bv_ptr, D, HAS_BIAS, DOT_FP32)
    do = _tile(do_ptr, rows, sdo_t, h, sdo_h, offs_d, msk, dmask, do_ptr, D, False, DOT_FP32)
    lse, delta = _row_stats(lse_ptr, o_ptr, so_t, so_h, do, h, T, rows, offs_d, msk, dmask)
    p, ds = _probs_and_dscores(q, kb, vb, do, lse, delta, msk, msk, qk_scale, DOT_FP32)
    dv = _dot(tl.trans(p).to(do.dtype), do, DOT_FP32)
    dk = _dot(tl.trans(ds).to(q.dtype), q, DOT_FP32) * scale
    dq = _dot(ds.to(kb.dtype), kb, DOT_FP32) * scale
    if HAS_BIAS:  # every slot of this (sequence, head) written, the key bias's zeros too: no memset before
        _bias_grad(db_ptr, dq, 0, b, 0, 1, HD, h, D, offs_d, dmask)
        tl.store(db_ptr + (b * 3 + 1) * HD + h * D + offs_d, tl.zeros([D_PAD], dtype=tl.float32), mask=dmask)
        _bias_grad(db_ptr, dv, 2, b, 0, 1, HD, h, D, offs_d, dmask)
    _store3(g_ptr, dq, dk, dv, rows, rows, sg_t, sg_s, sg_h, h, offs_d, msk, msk, dmask, WITH_DQ=True, WITH_DKDV=True)


@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, bq_ptr, bv_ptr, o_ptr, do_ptr, lse_ptr, g_ptr, db_ptr, cu_ptr,
                          sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, sdo_t, sdo_h, sg_t, sg_s, sg_h,
                          T, D, HD, NBLK,
                          scale, qk_scale,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                          HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr):
    pid_n, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(cu_ptr + b)
    seqlen = tl.load(cu_ptr + b + 1) - start
    _, nmask, offs_d, dmask, cols = _seq_block(start, seqlen, pid_n * BLOCK_N, D, BLOCK_N, D_PAD)
    if pid_n * BLOCK_N >= seqlen:
        return
    kb = _tile(k_ptr, cols, sk_t, h, sk_h, offs_d, nmask, dmask, k_ptr, D, False, DOT_FP32)
    vb = _tile(v_ptr, cols, sv_t, h, sv_h, offs_d, nmask, dmask, bv_ptr, D, HAS_BIAS, DOT_FP32)
    dk = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    dv = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    for m0 in range(0, seqlen, BLOCK_M):
        # names bound only in the loop: one bound before it (as ``_`` is) would be loop-carried, and the
        # compiler (not the interpreter) rejects a loop-carried value whose type changes
        _first_m, mmask, _offs_m, _dmask_m, rows = _seq_block(start, seqlen, m0, D, BLOCK_M, D_PAD)
        q = _tile(q_ptr, rows, sq_t, h, sq_h, offs_d, mmask, dmask, bq_ptr, D, HAS_BIAS, DOT_FP32)
        do = _tile(do_ptr, rows, sdo_t, h, sdo_h, offs_d, mmask, dmask, do_ptr, D, False, DOT_FP32)
        lse, delta = _row_stats(lse_ptr, o_ptr, so_t, so_h, do, h, T, rows, offs_d, mmask, dmask)
        p, ds = _probs_and_dscores(q, kb, vb, do, lse, delta, mmask, nmask, qk_scale, DOT_FP32)  # [BM, BN]
        dv += _dot(tl.trans(p).to(do.dtype), do, DOT_FP32)
        dk += _dot(tl.trans(ds).to(q.dtype), q, DOT_FP32) * scale
    if HAS_BIAS:
        _bias_grad(db_ptr, dv, 2, b, pid_n, NBLK, HD, h, D, offs_d, dmask)
    _store3(g_ptr, dk, dk, dv, cols, cols, sg_t, sg_s, sg_h, h, offs_d, nmask, nmask, dmask,
            WITH_DQ=False, WITH_DKDV=True)


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, bq_ptr, bv_ptr, o_ptr, do_ptr, lse_ptr, g_ptr, db_ptr, cu_ptr,
                        sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, sdo_t, sdo_h, sg_t, sg_s, sg_h,
                        T, D, HD, NBLK,
                        scale, qk_scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                        HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr):
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(cu_ptr + b)
    seqlen = tl.load(cu_ptr + b + 1) - start
    _, mmask, offs_d, dmask, rows = _seq_block(start, seqlen, pid_m * BLOCK_M, D, BLOCK_M, D_PAD)
    if pid_m * BLOCK_M >= seqlen:
        return
    q = _tile(q_ptr, rows, sq_t, h, sq_h, offs_d, mmask, dmask, bq_ptr, D, HAS_BIAS, DOT_FP32)
    do = _tile(do_ptr, rows, sdo_t, h, sdo_h, offs_d, mmask, dmask, do_ptr, D, False, DOT_FP32)
    lse, delta = _row_stats(lse_ptr, o_ptr, so_t, so_h, do, h, T, rows, offs_d, mmask, dmask)
    dq = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    for n0 in range(0, seqlen, BLOCK_N):
        _first_n, nmask, _offs_n, _dmask_n, cols = _seq_block(start, seqlen, n0, D, BLOCK_N, D_PAD)
        kb = _tile(k_ptr, cols, sk_t, h, sk_h, offs_d, nmask, dmask, k_ptr, D, False, DOT_FP32)
        vb = _tile(v_ptr, cols, sv_t, h, sv_h, offs_d, nmask, dmask, bv_ptr, D, HAS_BIAS, DOT_FP32)
        _p, ds = _probs_and_dscores(q, kb, vb, do, lse, delta, mmask, nmask, qk_scale, DOT_FP32)
        dq += _dot(ds.to(kb.dtype), kb, DOT_FP32) * scale
    if HAS_BIAS:
        _bias_grad(db_ptr, dq, 0, b, pid_m, NBLK, HD, h, D, offs_d, dmask)
    _store3(g_ptr, dq, dq, dq, rows, rows, sg_t, sg_s, sg_h, h, offs_d, mmask, mmask, dmask,
            WITH_DQ=True, WITH_DKDV=False)


ONE_TILE_MAX = 128  # sequences up to this length: one tile per (head, sequence), one backward kernel
# float32 inputs (exact IEEE dots) on a GPU: the one-tile backward at 128 needs 229,376 B of shared memory
# (ptxas for sm_90 and sm_80, `python -m bench.gpu_compile`): over an A100's 166,912 B per block and 3 KB
# under an H100's. Above 64 tokens float32 takes the two-kernel backward with 64 x 64 tiles (82 KB).
ONE_TILE_MAX_FP32 = 64
TILED = (64, 64, {"num_warps": 4, "num_stages": 2})  # BLOCK_M, BLOCK_N, launch options of the tiled kernels


def _cfg(max_seqlen: int, d: int) -> tuple[int, int, int, dict]:
    """(BLOCK_M, BLOCK_N, D_PAD, launch options). Up to 128 tokens a program holds the whole sequence;
    above, 64 x 64 tiles. ``BESTRQ2_ATTN_CFG=bm,bn,warps,stages`` overrides the choice
    (for tuning sweeps: bench/gpu_probe.py)."""
    d_pad = max(16, next_power_of_2(d))
    env = read("BESTRQ2_ATTN_CFG")
    if env:  # (also under the interpreter: the tests' way to run the tiled kernels with several row blocks)
        bm, bn, warps, stages = (int(x) for x in env.split(","))
        return bm, bn, d_pad, {"num_warps": warps, "num_stages": stages}
    if interpreting():  # one block per sequence: each interpreted loop step costs milliseconds
        blk = max(16, next_power_of_2(max_seqlen))
        return blk, blk, d_pad, {}
    if max_seqlen <= ONE_TILE_MAX:
        blk = max(16, next_power_of_2(max_seqlen))
        return blk, blk, d_pad, {"num_warps": 4 if blk <= 64 else 8, "num_stages": 1}
    return *TILED[:2], d_pad, dict(TILED[2])


def _dot_fp32(q: torch.Tensor) -> bool:
    """Exact float32 products for float32 inputs and under the interpreter (whose 16-bit dots are
    wrong); 16-bit inputs on a GPU use the tensor cores."""
    return interpreting() or q.dtype == torch.float32


def _st(t: torch.Tensor) -> tuple[int, int]:
    """(token stride, head stride) of a [T, H, Dh] tensor, or of a packed [T, 3, H, Dh] one."""
    return t.stride(0), t.stride(-2)


def _launch_fwd(q, k, v, biases, cu_seqlens, max_seqlen):
    """o [T, H, Dh] and the base-2 log-sum-exp [H, T]; biases: (bq, bv) each [H, Dh], or None."""
    t, h, d = q.shape
    b = cu_seqlens.shape[0] - 1
    o = torch.empty(t, h, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(h, t, dtype=torch.float32, device=q.device)
    bm, bn, d_pad, launch = _cfg(max_seqlen, d)
    wrap_triton(_attn_fwd_kernel)[(cdiv(max_seqlen, bm), h, b)](
        q, k, v, *(biases or (q, q)), o, lse, cu_seqlens, *_st(q), *_st(k), *_st(v), *_st(o), t, d,
        d ** -0.5 * LOG2E, BLOCK_M=bm, BLOCK_N=bn, D_PAD=d_pad, HAS_BIAS=biases is not None, DOT_FP32=_dot_fp32(q),
        **launch)
    return o, lse


def _launch_bwd(do, q, k, v, biases, o, lse, cu_seqlens, max_seqlen):
    """(dqkv [T, 3, H, Dh]: dQ, dK, dV in one tensor, the bias gradient [3, H, Dh] float32 or None). The bias
    gradient is summed here from the kernels' per-(sequence, row block) partials, when ``biases`` is given."""
    t, h, d = q.shape
    b = cu_seqlens.shape[0] - 1
    bm, bn, d_pad, launch = _cfg(max_seqlen, d)
    fp32 = _dot_fp32(q)
    scales = (d ** -0.5, d ** -0.5 * LOG2E)
    if fp32 and not interpreting() and max(bm, bn) > ONE_TILE_MAX_FP32:  # see ONE_TILE_MAX_FP32
        bm, bn, launch = TILED[0], TILED[1], dict(TILED[2])
    one_tile = max_seqlen <= ONE_TILE_MAX and bm >= max_seqlen and bn >= max_seqlen
    nblk = 1 if one_tile else max(cdiv(max_seqlen, bm), cdiv(max_seqlen, bn))
    g = torch.empty(t, 3, h, d, dtype=q.dtype, device=q.device)
    # the tiled kernels: zeros (a row block past a short sequence's end writes nothing); the one-tile kernel
    # writes every slot (a memset launch fewer, 16 a pretraining step)
    alloc = torch.empty if one_tile else torch.zeros
    part = alloc(b, nblk, 3, h, d, dtype=torch.float32, device=q.device) if biases is not None else lse
    args = (q, k, v, *(biases or (q, q)), o, do, lse, g, part, cu_seqlens, *_st(q), *_st(k), *_st(v), *_st(o),
            *_st(do), g.stride(0), g.stride(1), g.stride(2), t, d, h * d)
    common = dict(D_PAD=d_pad, HAS_BIAS=biases is not None, DOT_FP32=fp32, **launch)
    if one_tile:
        wrap_triton(_attn_bwd_one_tile_kernel)[(h, b)](*args, *scales, BLOCK=max(bm, bn), **common)
    else:
        # dK, dV then dQ into the same tensor, one kernel after the other
        wrap_triton(_attn_bwd_dkdv_kernel)[(cdiv(max_seqlen, bn), h, b)](
            *args, nblk, *scales, BLOCK_M=bm, BLOCK_N=bn, **common)
        wrap_triton(_attn_bwd_dq_kernel)[(cdiv(max_seqlen, bm), h, b)](
            *args, nblk, *scales, BLOCK_M=bm, BLOCK_N=bn, **common)
    return g, (part.sum((0, 1)) if biases is not None else None)


# ---- q, k, v as three [T, H, Dh] tensors (any strides with a unit last one)

@triton_op("bestrq2::attention_fwd", mutates_args={})
def _attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_fwd(q, k, v, None, cu_seqlens, max_seqlen)


@triton_op("bestrq2::attention_bwd", mutates_args={})
def _attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
              lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """dQ, dK, dV as one [T, 3, H, Dh] tensor (the autograd backward hands out its three slots)."""
    return _launch_bwd(do, q, k, v, None, o, lse, cu_seqlens, max_seqlen)[0]


@_attn_fwd.register_fake
def _attn_fwd_fake(q, k, v, cu_seqlens, max_seqlen):
    return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@_attn_bwd.register_fake
def _attn_bwd_fake(do, q, k, v, o, lse, cu_seqlens, max_seqlen):
    t, h, d = q.shape
    return q.new_empty(t, 3, h, d)


def _setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
    ctx.max_seqlen = max_seqlen
    ctx.set_materialize_grads(False)  # the log-sum-exp's gradient arrives as None, not as a zero tensor


def _backward(ctx, do, _dlse):
    if do is None:
        return None, None, None, None, None
    q, k, v, o, lse, cu = ctx.saved_tensors
    dq, dk, dv = _attn_bwd(do.contiguous(), q, k, v, o, lse, cu, ctx.max_seqlen).unbind(1)
    return dq, dk, dv, None, None


_attn_fwd.register_autograd(_backward, setup_context=_setup)


# ---- the packed output of the qkv linear, [T, 3, H, Dh], with its bias fused

def _biases(bias: torch.Tensor | None, h: int, d: int):
    """(query bias, value bias), each [H, Dh]: the key bias is left out (see the module doc)."""
    return None if bias is None else (bias.view(3, h, d)[0], bias.view(3, h, d)[2])


@triton_op("bestrq2::qkv_attention_fwd", mutates_args={})
def _qkv_attn_fwd(qkv: torch.Tensor, bias: torch.Tensor | None, cu_seqlens: torch.Tensor, max_seqlen: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, h, d = qkv.shape
    return _launch_fwd(qkv[:, 0], qkv[:, 1], qkv[:, 2], _biases(bias, h, d), cu_seqlens, max_seqlen)


@triton_op("bestrq2::qkv_attention_bwd", mutates_args={})
def _qkv_attn_bwd(do: torch.Tensor, qkv: torch.Tensor, bias: torch.Tensor | None, o: torch.Tensor, lse: torch.Tensor,
                  cu_seqlens: torch.Tensor, max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, h, d = qkv.shape
    dqkv, db = _launch_bwd(do, qkv[:, 0], qkv[:, 1], qkv[:, 2], _biases(bias, h, d), o, lse, cu_seqlens, max_seqlen)
    return dqkv, (db.flatten() if db is not None else qkv.new_empty(0, dtype=torch.float32))


@_qkv_attn_fwd.register_fake
def _qkv_attn_fwd_fake(qkv, bias, cu_seqlens, max_seqlen):
    t, _, h, d = qkv.shape
    return qkv.new_empty(t, h, d), qkv.new_empty(h, t, dtype=torch.float32)


@_qkv_attn_bwd.register_fake
def _qkv_attn_bwd_fake(do, qkv, bias, o, lse, cu_seqlens, max_seqlen):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format), \
        qkv.new_empty(0 if bias is None else bias.numel(), dtype=torch.float32)


def _qkv_setup(ctx, inputs, output):
    qkv, bias, cu_seqlens, max_seqlen = inputs
    o, lse = output
    ctx.save_for_backward(qkv, bias, o, lse, cu_seqlens)
    ctx.max_seqlen = max_seqlen
    ctx.set_materialize_grads(False)  # the log-sum-exp's gradient arrives as None, not as a zero tensor


def _qkv_backward(ctx, do, _dlse):
    if do is None:
        return None, None, None, None
    qkv, bias, o, lse, cu = ctx.saved_tensors
    dqkv, db = _qkv_attn_bwd(do.contiguous(), qkv, bias, o, lse, cu, ctx.max_seqlen)
    return dqkv, (None if bias is None else db.to(bias.dtype)), None, None


_qkv_attn_fwd.register_autograd(_qkv_backward, setup_context=_qkv_setup)


def _check(max_seqlen: int, head_dim: int, **tensors: torch.Tensor) -> None:
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"triton attention takes head dim <= {MAX_HEAD_DIM}, got {head_dim}")
    if max_seqlen > MAX_SEQLEN:
        raise ValueError(f"triton attention is built for sequences of <= {MAX_SEQLEN} tokens, got {max_seqlen}")
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last dim")


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int) -> torch.Tensor:
    """Ragged attention, [T, H, Dh] in and out. Inputs may be strided views (e.g. of a packed qkv)."""
    _check(max_seqlen, q.shape[-1], q=q, k=k, v=v)
    return _attn_fwd(q, k, v, cu_seqlens.to(torch.int32).contiguous(), int(max_seqlen))[0]


def triton_qkv_attention(qkv: torch.Tensor, bias: torch.Tensor | None, cu_seqlens: torch.Tensor,
                         max_seqlen: int) -> torch.Tensor:
    """Ragged attention of the qkv linear's packed output: qkv [T, 3, H, Dh] (without the linear's bias),
    bias [3 H Dh] (the linear's, added inside the kernels) or None -> o [T, H, Dh]. The backward gives
    qkv's gradient as one [T, 3, H, Dh] tensor and the bias gradient in the bias's dtype."""
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must be [T, 3, H, Dh], got {tuple(qkv.shape)}")
    t, _, h, d = qkv.shape
    if bias is not None and bias.numel() != 3 * h * d:
        raise ValueError(f"bias must hold 3 * H * Dh = {3 * h * d} values, got {tuple(bias.shape)}")
    _check(max_seqlen, d, qkv=qkv)
    return _qkv_attn_fwd(qkv, None if bias is None else bias.contiguous().view(-1),
                         cu_seqlens.to(torch.int32).contiguous(), int(max_seqlen))[0]
