"""Prediction head + cross-entropy that never holds all the logits.

``linear_cross_entropy(h, weight, bias, targets, ignore_index=-100) -> (loss, accuracy)``

- h [M, D]; weight [C, K, D]; bias [C, K] or None; targets int [M, C] (ignore_index skipped).
- loss: mean over codebooks of each codebook's mean cross-entropy over its non-ignored rows
  (= mean_c F.cross_entropy(h @ W_c^T + b_c, targets[:, c])); accuracy: float32 [C] top-1 accuracy
  per codebook (no grad).

How: rows are processed in chunks. Per chunk and codebook, the logits come from one matmul (cuBLAS),
a Triton kernel computes each row's log-sum-exp, loss and argmax and overwrites the logits in place
with d loss / d logits (one pass over the row held in registers when K <= 16384, else an online pass
over K tiles and a second one for the grad); then two more matmuls give the chunk's contribution to
grad_h and grad_W. Gradients are computed during the forward (the loss is a scalar: the backward only
scales them). With one codebook grad_h is written in the input dtype straight into its rows; grad_W
and grad_b accumulate in float32 across chunks (on CUDA in the GEMM itself: ``addmm`` with a float32
output; elsewhere each chunk's product is rounded once to the input dtype, then added).

Chunk rule (``choose_chunk``): memory only. rows = min(M, 64 MiB // (K * itemsize)), at least 64: one
chunk when the logits fit 64 MiB (at the paper's shape, M 16,384 x K 8,192 in bf16, four chunks of
4,096 rows). The live extra memory is one chunk of logits plus grad_h [M, D] and grad_W [C, K, D].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._rounding import round_to_bf16_rtne
from ._dispatch import block_for, check_tensor, checking, interpreting, same_device, use_triton
from ._op import custom_op

IGNORE = -100


def linear_cross_entropy_ref(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             targets: torch.Tensor, ignore_index: int = IGNORE) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused: full logits [M, C, K], then F.cross_entropy per codebook in float32 (a codebook with no
    counted target contributes loss 0, as in the fused path: no host-side branch)."""
    logits = torch.einsum("md,ckd->mck", h, weight)
    if bias is not None:
        logits = logits + bias
    c = weight.shape[0]
    t = targets.long()
    valid = t != ignore_index
    count = valid.sum(0).clamp_min(1)  # no counted target: loss 0 (with a zero grad), no host branch
    losses = [F.cross_entropy(logits[:, i].float(), t[:, i], ignore_index=ignore_index, reduction="sum") / count[i]
              for i in range(c)]
    with torch.no_grad():
        hit = (logits.argmax(-1) == t) & valid
        acc = hit.sum(0).float() / count.float()
    return torch.stack(losses).mean(), acc


CHUNK_BUDGET = 64 << 20  # bytes of logits per chunk


def choose_chunk(m: int, k: int, itemsize: int, device: torch.device | None = None) -> int:
    """Rows per chunk: as many as fit ``CHUNK_BUDGET`` bytes of logits (all M when they fit), >= 64."""
    return int(max(1, min(m, max(64, CHUNK_BUDGET // max(1, k * itemsize)))))


@triton.jit
def _ce_rows_kernel(logits_ptr, stride_row, targets_ptr, stride_t, loss_ptr, hit_ptr, K, scale_ptr, ignore_index,
                    BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """One row: lse, loss, argmax hit; then logits <- (softmax - onehot) * scale (0 for ignored rows).
    ONE_TILE (K <= BLOCK_K): the row is loaded once and stays in registers for both steps."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row * stride_t).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    valid = target != ignore_index
    row_scale = tl.where(valid, tl.load(scale_ptr), 0.0)
    if ONE_TILE:
        kmask = kk < K
        x = tl.load(base + kk, mask=kmask, other=float("-inf")).to(tl.float32)
        run_max = tl.max(x, axis=0)
        best_idx = tl.argmax(x, axis=0).to(tl.int64)
        e = tl.exp(x - run_max)
        lse = run_max + tl.log(tl.sum(e, axis=0))
        x_target = tl.sum(tl.where(kk == target, x, 0.0), axis=0)
        g = (e / tl.sum(e, axis=0) - tl.where(kk == target, 1.0, 0.0)) * row_scale
        if ROUND_BF16:
            g = round_to_bf16_rtne(g)
        tl.store(base + kk, g.to(logits_ptr.dtype.element_ty), mask=kmask)
    else:
        run_max = tl.full((), float("-inf"), tl.float32)
        run_sum = tl.zeros((), tl.float32)
        best_idx = tl.zeros((), tl.int64)
        x_target = tl.zeros((), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = (k0 + kk) < K
            x = tl.load(base + k0 + kk, mask=kmask, other=float("-inf")).to(tl.float32)
            tile_max = tl.max(x, axis=0)
            tile_arg = tl.argmax(x, axis=0).to(tl.int64) + k0
            best_idx = tl.where(tile_max > run_max, tile_arg, best_idx)
            new_max = tl.maximum(run_max, tile_max)
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            run_max = new_max
            x_target += tl.sum(tl.where((k0 + kk) == target, x, 0.0), axis=0)
        lse = run_max + tl.log(run_sum)
        for k0 in range(0, K, BLOCK_K):
            kmask = (k0 + kk) < K
            x = tl.load(base + k0 + kk, mask=kmask, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where((k0 + kk) == target, 1.0, 0.0)) * row_scale
            if ROUND_BF16:
                g = round_to_bf16_rtne(g)
            tl.store(base + k0 + kk, g.to(logits_ptr.dtype.element_ty), mask=kmask)
    tl.store(loss_ptr + row, tl.where(valid, lse - x_target, 0.0))
    tl.store(hit_ptr + row, (valid & (best_idx == target)).to(tl.int32))


@triton_op("bestrq2::ce_rows_", mutates_args={"logits"})
def _ce_rows(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, ignore_index: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    rows, k = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    hit = torch.empty(rows, dtype=torch.int32, device=logits.device)
    block = block_for(k, 65536 if interpreting() else 16384)
    # a whole row per program, in registers: 8 warps up to 4096 logits, 16 above
    warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    wrap_triton(_ce_rows_kernel)[(rows,)](logits, logits.stride(0), targets, targets.stride(0), loss, hit, k,
                                          scale, ignore_index, BLOCK_K=block, ONE_TILE=k <= block,
                                          # CUDA's cast rounds to nearest; the interpreter truncates, so
                                          # there the rounding is done by hand (for the tests' bound)
                                          ROUND_BF16=logits.dtype == torch.bfloat16 and interpreting(),
                                          num_warps=warps)
    return loss, hit


@_ce_rows.register_fake
def _ce_rows_fake(logits, targets, scale, ignore_index):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.int32)


def _ce_rows_torch(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, ignore_index: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The row step in plain PyTorch (same contract as the Triton kernel), in place on float32 logits so a
    chunk costs no second [rows, K] buffer: for CPUs, where the chunked algorithm still saves the memory
    of the full logits."""
    x = logits if logits.dtype == torch.float32 else logits.float()
    valid = targets != ignore_index
    t = targets.long().clamp_min(0)
    hit = (valid & (x.argmax(1) == t)).to(torch.int32)
    x_t = x.gather(1, t[:, None])[:, 0]
    top = x.amax(1)
    x.sub_(top[:, None]).exp_()  # exp(x - max)
    total = x.sum(1)
    loss = torch.where(valid, top + torch.log(total) - x_t, 0.0)
    x.div_(total[:, None])  # softmax
    x.scatter_add_(1, t[:, None], -torch.ones_like(total)[:, None])
    x.mul_(torch.where(valid, scale, 0.0)[:, None])
    if x is not logits:
        logits.copy_(x)
    return loss, hit


@custom_op("bestrq2::linear_cross_entropy_fused", mutates_args=())
def _lce_fused(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
               ignore_index: int, chunk: int, row_step: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, accuracy and the gradients (float32) in one pass over row chunks. An opaque custom op:
    torch.compile sees only its shapes, so the chunk loop (which depends on M) never specialises a
    compiled graph on the masked count. ``chunk`` <= 0: ``choose_chunk``."""
    m, d = h.shape
    c, k, _ = weight.shape
    if chunk <= 0:
        chunk = choose_chunk(m, k, h.element_size(), h.device)
    t = targets.long()
    valid = t != ignore_index  # [M, C]
    n_valid = valid.sum(0)  # [C]
    # one codebook: each row's grad_h is one product, written in the input dtype into its rows;
    # several: a float32 sum over codebooks
    grad_h = torch.empty(m, d, dtype=h.dtype, device=h.device) if c == 1 else \
        torch.zeros(m, d, dtype=torch.float32, device=h.device)
    grad_w = torch.zeros(c, k, d, dtype=torch.float32, device=h.device)
    grad_b = torch.zeros(c if bias is not None else 0, k, dtype=torch.float32, device=h.device)
    loss_sum = torch.zeros(c, dtype=torch.float32, device=h.device)
    hits = torch.zeros(c, dtype=torch.float32, device=h.device)
    # d loss / d logit scale: mean over each codebook's valid rows, then over codebooks. A tensor, so
    # nothing syncs with the host; no counted target gives loss and grads 0
    scales = 1.0 / (n_valid.clamp_min(1).float() * c)
    step = _ce_rows if row_step == "triton" else _ce_rows_torch
    for ci in range(c):
        w = weight[ci]
        for r0 in range(0, m, chunk):
            hc = h[r0: r0 + chunk]
            logits = hc @ w.T if bias is None else torch.addmm(bias[ci], hc, w.T)
            tc = t[r0: r0 + chunk, ci].contiguous()
            loss_rows, hit_rows = step(logits, tc, scales[ci: ci + 1], ignore_index)  # logits now hold the grad
            loss_sum[ci] += loss_rows.sum()
            hits[ci] += hit_rows.sum()
            if c == 1:
                torch.mm(logits, w, out=grad_h[r0: r0 + chunk])
            else:
                grad_h[r0: r0 + chunk] += (logits @ w).float()
            _accumulate_mm(grad_w[ci], logits.T, hc)
            if bias is not None:
                grad_b[ci] += logits.sum(0, dtype=torch.float32)
    loss = (loss_sum / n_valid.clamp_min(1).float()).mean()
    acc = hits / n_valid.clamp_min(1).float()
    return loss, acc, grad_h, grad_w, grad_b


_F32_OUT_MM: dict[str, bool] = {}


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b. On CUDA with 16-bit inputs one GEMM accumulates in float32 and adds into
    acc (``addmm`` with ``out_dtype``, probed once per device type); elsewhere the product is rounded to
    the inputs' dtype, then added."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    kind = a.device.type
    if kind not in _F32_OUT_MM:
        try:
            z = torch.zeros(2, 2, device=a.device)
            torch.addmm(z, a[:2, :1], b[:1, :2], out_dtype=torch.float32)
            _F32_OUT_MM[kind] = True
        except (RuntimeError, NotImplementedError, TypeError):
            _F32_OUT_MM[kind] = False
    if _F32_OUT_MM[kind]:
        acc.copy_(torch.addmm(acc, a, b, out_dtype=torch.float32))
    else:
        acc += (a @ b).float()


@_lce_fused.register_fake
def _lce_fused_fake(h, weight, bias, targets, ignore_index, chunk, row_step):
    m, d = h.shape
    c, k, _ = weight.shape
    f32 = torch.float32
    return (h.new_empty((), dtype=f32), h.new_empty(c, dtype=f32), h.new_empty(m, d, dtype=h.dtype if c == 1 else f32),
            h.new_empty(c, k, d, dtype=f32), h.new_empty(c if bias is not None else 0, k, dtype=f32))


def _lce_setup(ctx, inputs, output):
    h, weight, bias = inputs[:3]
    ctx.save_for_backward(*output[2:])
    ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
    # the accuracy and the saved gradients are outputs no loss differentiates: theirs arrive as None, not
    # as zero tensors autograd would write (grad_W's is C x K x D float32, 25 MB at the paper's head)
    ctx.set_materialize_grads(False)


def _lce_backward(ctx, grad_loss, _grad_acc, _gh, _gw, _gb):
    """The loss is a scalar: its gradients were computed in the forward and only scale here."""
    if grad_loss is None:
        return (None,) * 7
    grad_h, grad_w, grad_b = ctx.saved_tensors
    hd, wd, bd = ctx.dtypes
    gb = (grad_b * grad_loss).to(bd) if bd is not None else None
    return (grad_h * grad_loss).to(hd), (grad_w * grad_loss).to(wd), gb, None, None, None, None


_lce_fused.register_autograd(_lce_backward, setup_context=_lce_setup)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                         ignore_index: int = IGNORE, chunk: int | None = None, impl: str | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy [C]). ``impl``: "auto" (fused on CUDA, the unfused reference elsewhere; also
    None, which reads ``BESTRQ2_KERNELS``), "reference" (unfused), "triton" (chunked, Triton row kernel)
    or "torch" (the same chunked algorithm with the row step in PyTorch ops; low memory on CPU)."""
    check_tensor("h", h, dims=(2,), floating=True)
    check_tensor("weight", weight, dims=(3,), floating=True)
    check_tensor("targets", targets, dims=(2,), integer=True)
    m, d = h.shape
    c, k, dw = weight.shape
    if dw != d:
        raise ValueError(f"weight must be [C, K, D] with D = {d} (h is {list(h.shape)}), got {list(weight.shape)}")
    if weight.dtype != h.dtype:
        raise ValueError(f"h and weight must share a dtype, got {h.dtype} and {weight.dtype}")
    if targets.shape != (m, c):
        raise ValueError(f"targets must be [M, C] = {[m, c]}, got {list(targets.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dims=(2,), floating=True)
        if bias.shape != (c, k):
            raise ValueError(f"bias must be [C, K] = {[c, k]}, got {list(bias.shape)}")
    same_device(h=h, weight=weight, bias=bias, targets=targets)
    if not (m >= 1):
        raise ValueError("h has no rows")
    if checking(targets):
        t = targets.long()
        bad = (t != ignore_index) & ((t < 0) | (t >= k))
        if bool(bad.any()):
            raise ValueError(f"targets must lie in [0, {k}) or equal ignore_index={ignore_index}; "
                             f"got {t[bad][:5].tolist()}")
    if impl not in (None, "auto", "reference", "triton", "torch"):
        raise ValueError(f"impl must be auto, reference, triton or torch, got {impl!r}")
    if impl != "torch":
        impl = "triton" if use_triton(h, impl=impl) else "reference"
    if impl == "reference":
        return linear_cross_entropy_ref(h, weight, bias, targets, ignore_index)
    if not (chunk is None or chunk >= 1):
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    loss, acc, *_ = _lce_fused(h.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
                               targets, ignore_index, chunk or 0, impl)
    return loss, acc
