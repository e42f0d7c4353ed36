"""Fused random-projection quantizer: codes of 16 x 16 log-mel patches without the score matrix.

``rpq_codes(x, projection, codebooks, index=None) -> int64 [M, C]``

- x: raw patches [M, 256], or a log-mel batch [B, F, T] (F a multiple of 16; T cut to a multiple
  of 16) read in place, patches in the official order (token n = f * W + t, value df * 16 + dt);
  with ``index`` int [B, m] only those tokens are read and M = B * m, else M = B * N.
- projection [C, 256, d]; codebooks [C, K, d] with unit rows.
- For each patch and codebook: z = normalize(x @ P_c), code = argmax_k <z, CB_c[k]>; ties go to the
  lowest index, as torch.argmax.

The kernel streams codebook tiles and keeps a running best, runner-up and code per row and column
slot of the tile (reduced across the slots once, after the last tile), so memory is O(M * C) and
nothing of size M x K is written. When there are fewer row blocks than twice the GPU's
SMs (small batches: on an H200 the first version sat at ~0.26 ms from B = 32 to 128), the codebook is
split across programs and the per-split maxima merged (ties still to the lowest index). Loads any
float dtype. Scores run on the tensor cores as tf32x3 (near-float32; plain TF32's ~1e-3 error would
flip codes), keeping each row's best and runner-up; rows whose margin is below ``RESCORE_MARGIN``
(1e-4, above tf32x3's ~1.5e-5 worst case) are scored again in IEEE float32 by a second launch that
skips every other row block, so the codes equal the IEEE path's. Forward only (targets carry no
gradient).

Work per call: reads M * 256 input values, C * (256 d + K d) weights; 2 M C (256 d + K d) FLOPs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..config import PATCH
from ..env import read
from ..frontend import patchify, truncate_to_patches
from ._dispatch import block_for, cdiv, check_tensor, checking, gpu_splits, interpreting, same_device, use_triton
from ._op import triton_op


# --------------------------------------------------------------------------------------- reference
def rpq_scores_ref(patches: torch.Tensor, projection: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Cosine of every patch with every code: patches [..., 256] -> [..., C, K] in float32 (float64
    when the patches are float64), whatever the caller's autocast."""
    dt = torch.float64 if patches.dtype == torch.float64 else torch.float32
    with torch.autocast(patches.device.type, enabled=False):
        proj = torch.einsum("...i,cid->...cd", patches.to(dt), projection.to(dt))
        proj = F.normalize(proj, dim=-1)
        return torch.einsum("...cd,ckd->...ck", proj, codebooks.to(dt))


NORMS = ("none", "patch", "bin")
NORM_EPS = 1e-5


def normalize_input(x: torch.Tensor, norm: str = "none", bin_mean: torch.Tensor | None = None,
                    bin_std: torch.Tensor | None = None) -> torch.Tensor:
    """The quantizer's input normalisation. ``bin``: a log-mel [B, F, T] standardised per mel bin with
    corpus statistics (mean, std [F]); ``patch`` is applied to patches (``normalize_patches``)."""
    if norm == "bin":
        return (x - bin_mean[:, None]) / bin_std[:, None]
    return x


def normalize_patches(patches: torch.Tensor, norm: str = "none") -> torch.Tensor:
    """``patch``: each 256-value patch to zero mean and unit variance (eps 1e-5 on the variance)."""
    if norm != "patch":
        return patches
    mean = patches.mean(-1, keepdim=True)
    var = patches.var(-1, unbiased=False, keepdim=True)
    return (patches - mean) / torch.sqrt(var + NORM_EPS)


def spec_patches(spec: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Log-mel [B, F, T] -> patches [B, N or m, 256] in the official order (``frontend.patchify``)."""
    x = patchify(truncate_to_patches(spec))
    if index is not None:
        x = torch.gather(x, 1, index.long()[..., None].expand(-1, -1, x.shape[-1]))
    return x


def rpq_codes_ref(x: torch.Tensor, projection: torch.Tensor, codebooks: torch.Tensor,
                  index: torch.Tensor | None = None, norm: str = "none", bin_mean: torch.Tensor | None = None,
                  bin_std: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: materialises the [M, C, K] score matrix. Same contract as ``rpq_codes``."""
    if x.dim() == 3:
        x = spec_patches(normalize_input(x, norm, bin_mean, bin_std), index)
    patches = normalize_patches(x.reshape(-1, x.shape[-1]), norm)
    return rpq_scores_ref(patches, projection, codebooks).argmax(dim=-1)


# ------------------------------------------------------------------------------------------ kernel
# Scores go through the tensor cores as tf32x3 (three tf32 products: near-float32, not exactly it),
# split by hand (``_tf32_hi``) so that z is split once per row block, not per codebook tile. Its error
# on a cosine of unit 16-dim vectors stays below d * 2^-20 ~ 1.5e-5 (about 2e-7 seen in the test that
# emulates the tensor cores' operand truncation); a row whose best two
# codes lie closer than RESCORE_MARGIN may differ from the IEEE float32 argmax and is scored again in
# IEEE float32 by a second launch over those rows only (no host sync: the flags stay on the device).
RESCORE_MARGIN = 1e-4


@triton.jit
def _tf32_hi(x):
    """x rounded to its nearest tf32 (10 mantissa bits; finite x): the high part of a 3xTF32 split,
    x - _tf32_hi(x) the low part, exact in float32."""
    return ((x.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _rpq_codes_fwd_kernel(
    x_ptr, stride_xb, stride_xr, stride_xc,  # spec [B, F, T] strides, or raw [M, 256] as (0, row, col)
    idx_ptr, m_per_clip, num_tokens, width,
    p_ptr, cb_ptr, best_ptr, second_ptr, arg_ptr, need_ptr, bmean_ptr, bstd_ptr,
    M, K, C, D, K_PER,
    FROM_SPEC: tl.constexpr, HAS_INDEX: tl.constexpr, PRECISION: tl.constexpr, RESCORE: tl.constexpr,
    NORM: tl.constexpr,
    D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Per row block and codebook (and codebook split): best score, runner-up and argmax over the
    split's codes. RESCORE: the second launch; rows not flagged in need_ptr exit at once, flagged ones
    get their code from IEEE scores over the whole codebook, written into arg_ptr ([M, C])."""
    pid = tl.program_id(0)
    c = tl.program_id(1)
    split = tl.program_id(2)  # codes [split * K_PER, (split + 1) * K_PER) of K
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    if RESCORE:
        need = tl.load(need_ptr + rows.to(tl.int64) * C + c, mask=rmask, other=0) != 0
        if tl.max(need.to(tl.int32), axis=0) == 0:
            return
        rmask = rmask & need
    j = tl.arange(0, 256)
    # offsets: one int64 base per row plus an int32 offset within the patch, not [BLOCK_M, 256] int64 index
    # math (a small register saving; the spills went with the smaller row tile, see RPQ_BLOCK_M)
    if FROM_SPEC:
        if HAS_INDEX:
            b = rows // m_per_clip
            n = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int32)  # a token of the 8 x W grid
        else:
            b = rows // num_tokens
            n = rows % num_tokens
        f = n // width
        t = n % width
        base = b.to(tl.int64) * stride_xb + (f * 16).to(tl.int64) * stride_xr + (t * 16).to(tl.int64) * stride_xc
        inner = (j // 16) * stride_xr + (j % 16) * stride_xc  # within the 16 x 16 patch: small, int32
    else:
        base = rows.to(tl.int64) * stride_xr
        inner = j * stride_xc
    offs = base[:, None] + inner[None, :]
    x = tl.load(x_ptr + offs, mask=rmask[:, None], other=0.0).to(tl.float32)  # [BLOCK_M, 256]
    if NORM == 2:  # "bin": per mel bin, corpus statistics (only from a log-mel input)
        fr = f[:, None] * 16 + (j // 16)[None, :]  # the mel bin of each element
        x = (x - tl.load(bmean_ptr + fr)) / tl.load(bstd_ptr + fr)
    if NORM == 1:  # "patch": each patch to zero mean, unit variance
        mean = tl.sum(x, axis=1) / 256
        xc = x - mean[:, None]
        x = xc / tl.sqrt(tl.sum(xc * xc, axis=1) / 256 + 1e-5)[:, None]

    dd = tl.arange(0, D_PAD)
    dmask = dd < D
    p = tl.load(p_ptr + c * 256 * D + j[:, None] * D + dd[None, :], mask=dmask[None, :], other=0.0).to(tl.float32)
    z = tl.dot(x, p, input_precision="ieee")  # [BLOCK_M, D_PAD]
    norm = tl.sqrt(tl.sum(z * z, axis=1))
    z = z / tl.maximum(norm, 1e-12)[:, None]  # F.normalize
    if PRECISION == "tf32x3":  # 3xTF32 by hand: z split once here, not per tile (unit rows: no inf / nan)
        z_hi = _tf32_hi(z)
        z_lo = z - z_hi

    # running best / runner-up / code per (row, column slot) of the tile, reduced across the slots once
    # after the loop: the loop body is dot + compare-and-select, with no cross-thread reduction (a row's
    # scores are spread over the threads of several warps in the dot's layout; reducing each tile cost
    # shuffles and shared-memory barriers: 702 SASS instructions per tile against 48 tensor-core ones)
    kk = tl.arange(0, BLOCK_K)
    k_lo = split * K_PER
    k_hi = tl.minimum(K, k_lo + K_PER)
    run_best = tl.full((BLOCK_M, BLOCK_K), float("-inf"), tl.float32)
    run_second = tl.full((BLOCK_M, BLOCK_K), float("-inf"), tl.float32)
    run_arg = tl.zeros((BLOCK_M, BLOCK_K), tl.int32) + (k_lo + kk)[None, :]  # distinct per slot
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kmask = (k0 + kk) < k_hi
        cb = tl.load(cb_ptr + c * K * D + (k0 + kk)[:, None] * D + dd[None, :],
                     mask=kmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # [BLOCK_K, D_PAD]
        if PRECISION == "tf32x3":  # lo*hi + hi*lo + hi*hi on the tensor cores; lo*lo (< 2^-22) dropped
            cb_hi = _tf32_hi(cb)
            cbt_hi, cbt_lo = tl.trans(cb_hi), tl.trans(cb - cb_hi)
            s = tl.dot(z_lo, cbt_hi, input_precision="tf32")
            s = tl.dot(z_hi, cbt_lo, s, input_precision="tf32")
            s = tl.dot(z_hi, cbt_hi, s, input_precision="tf32")  # [BLOCK_M, BLOCK_K]
        else:
            s = tl.dot(z, tl.trans(cb), input_precision="ieee")
        if not EVEN_K:
            s = tl.where(kmask[None, :], s, float("-inf"))
        gt = s > run_best  # strict: within a slot the earlier (lower) code keeps a tie
        run_second = tl.where(gt, run_best, tl.maximum(run_second, s))
        run_best = tl.where(gt, s, run_best)
        run_arg = tl.where(gt, (k0 + kk)[None, :], run_arg)
    best = tl.max(run_best, axis=1)
    # the lowest code among the slots that reach the maximum (argmax's first-of-equals rule)
    arg = tl.min(tl.where(run_best == best[:, None], run_arg, 2147483647), axis=1)
    # runner-up: the winning slot's own second, every other slot's best
    second = tl.max(tl.where(run_arg == arg[:, None], run_second, run_best), axis=1)
    if RESCORE:
        tl.store(arg_ptr + rows.to(tl.int64) * C + c, arg.to(tl.int64), mask=rmask)
    else:
        o = (split * M + rows).to(tl.int64) * C + c
        tl.store(best_ptr + o, best, mask=rmask)
        tl.store(second_ptr + o, second, mask=rmask)
        tl.store(arg_ptr + o, arg.to(tl.int64), mask=rmask)


# the compiled path's tiles (ptxas for sm_90 through `python -m bench.gpu_compile`; BESTRQ2_RPQ_CFG overrides
# for sweeps): 32 rows x 128 codes at 4 warps issue 374 instructions per tile (11.7 per score) at 218
# registers, no spills in any variant; 32 x 64 at 4 warps and 32 x 128 at 8 hold 128 registers (twice the
# warps per SM) at 13.1 per score; 64 x 64 at 4 warps spills 1.8 KB a thread (3 running values per score slot).
# Which is fastest is for the card to say: the GPU bench times the two others beside this one.
RPQ_BLOCK_M, RPQ_BLOCK_K, RPQ_WARPS = 32, 128, 4


def _layout(x: torch.Tensor, index: torch.Tensor | None, k: int):
    """Launch geometry shared by both launches: (rows M, strides, index pointer, per-clip counts, blocks)."""
    from_spec = x.dim() == 3
    if from_spec:
        b, fbins, t = x.shape
        width = t // PATCH
        num_tokens = (fbins // PATCH) * width
        m_per_clip = index.shape[1] if index is not None else num_tokens
        m = b * m_per_clip
        strides = (x.stride(0), x.stride(1), x.stride(2))
    else:
        m, width, num_tokens, m_per_clip = x.shape[0], 1, 1, 1
        strides = (0, x.stride(0), x.stride(1))
    idx = index.reshape(-1) if index is not None else x  # unused pointer when there is no index
    if cfg := read("BESTRQ2_RPQ_CFG"):  # block_m,block_k,warps: tuning sweeps, tests of many small tiles
        block_m, block_k, warps = (int(v) for v in cfg.split(","))
        launch = {"num_warps": warps}
    elif interpreting():  # few, large blocks: each interpreted loop step costs milliseconds
        block_m, block_k, launch = block_for(m, 256), block_for(k, 2048), {}
    else:
        block_m, block_k, launch = RPQ_BLOCK_M, RPQ_BLOCK_K, {"num_warps": RPQ_WARPS}
    return m, strides, idx, (m_per_clip, num_tokens, width), from_spec, block_m, block_k, launch


def rescore_rows(x: torch.Tensor, projection: torch.Tensor, codebooks: torch.Tensor, index: torch.Tensor | None,
                 codes: torch.Tensor, need: torch.Tensor, norm: int = 0, bin_mean: torch.Tensor | None = None,
                 bin_std: torch.Tensor | None = None) -> None:
    """codes [M, C] of the rows flagged in need (int8 [M, C]) recomputed from IEEE float32 scores over
    the whole codebook, in place; row blocks without a flagged row exit at once."""
    c, k, d = codebooks.shape
    m, strides, idx, per, from_spec, block_m, block_k, launch = _layout(x, index, k)
    stats = (bin_mean, bin_std) if bin_mean is not None else (x, x)
    wrap_triton(_rpq_codes_fwd_kernel)[(cdiv(m, block_m), c, 1)](
        x, *strides, idx, *per, projection, codebooks, codes, codes, codes, need, *stats, m, k, c, d, k,
        FROM_SPEC=from_spec, HAS_INDEX=index is not None, PRECISION="ieee", RESCORE=True, NORM=norm,
        D_PAD=block_for(d, 1 << 16), BLOCK_M=block_m, BLOCK_K=block_k, EVEN_K=k % block_k == 0, **launch)


@triton_op("bestrq2::rpq_codes", mutates_args={})
def _rpq_codes_op(x: torch.Tensor, projection: torch.Tensor, codebooks: torch.Tensor,
                  index: torch.Tensor | None, norm: int, bin_mean: torch.Tensor | None,
                  bin_std: torch.Tensor | None) -> torch.Tensor:
    codes, need = top_two(x, projection, codebooks, index, norm, bin_mean, bin_std)[2:]
    rescore_rows(x, projection, codebooks, index, codes, need, norm, bin_mean, bin_std)
    return codes


def top_two(x: torch.Tensor, projection: torch.Tensor, codebooks: torch.Tensor, index: torch.Tensor | None,
            norm: int = 0, bin_mean: torch.Tensor | None = None, bin_std: torch.Tensor | None = None):
    """The first launch, splits merged: (best score, runner-up score, code, need) each [M, C]; scores
    from the fast (tf32x3) dot, need (int8) flags the rows whose margin is below RESCORE_MARGIN."""
    c, k, d = codebooks.shape
    m, strides, idx, per, from_spec, block_m, block_k, launch = _layout(x, index, k)
    splits, k_per = _k_splits(cdiv(m, block_m) * c, k, block_k, x.device)
    best = torch.empty(splits, m, c, dtype=torch.float32, device=x.device)
    second = torch.empty(splits, m, c, dtype=torch.float32, device=x.device)
    arg = torch.empty(splits, m, c, dtype=torch.int64, device=x.device)
    stats = (bin_mean, bin_std) if bin_mean is not None else (x, x)
    wrap_triton(_rpq_codes_fwd_kernel)[(cdiv(m, block_m), c, splits)](
        x, *strides, idx, *per, projection, codebooks, best, second, arg, arg, *stats, m, k, c, d, k_per,
        FROM_SPEC=from_spec, HAS_INDEX=index is not None, PRECISION="tf32x3", RESCORE=False, NORM=norm,
        D_PAD=block_for(d, 1 << 16), BLOCK_M=block_m, BLOCK_K=block_k, EVEN_K=k % block_k == 0, **launch)
    # merge the splits: the best split per row (argmax takes the first of equal maxima, i.e. the lowest
    # code index); the runner-up is the larger of that split's own second and the other splits' bests
    top = best.argmax(0, keepdim=True)
    codes = arg.gather(0, top)[0]
    runner = second.gather(0, top)[0]
    if splits > 1:
        runner = torch.maximum(runner, best.scatter(0, top, float("-inf")).amax(0))
    top_score = best.gather(0, top)[0]
    need = ((top_score - runner) < RESCORE_MARGIN).to(torch.int8)  # near-ties: IEEE decides
    return top_score, runner, codes, need


def _k_splits(programs: int, k: int, block_k: int, device: torch.device) -> tuple[int, int]:
    """(splits, codes per split). Small batches give fewer row blocks than the GPU has SMs: the
    codebook is then split across programs (each keeps its own max/argmax) and merged after.
    ``BESTRQ2_RPQ_SPLIT=n`` forces n (tests use it under the interpreter)."""
    tiles = cdiv(k, block_k)
    want = gpu_splits(programs, tiles, device, "BESTRQ2_RPQ_SPLIT")
    k_per = cdiv(tiles, want) * block_k  # whole tiles per split, every split non-empty
    return cdiv(k, k_per), k_per


@_rpq_codes_op.register_fake
def _rpq_codes_fake(x, projection, codebooks, index, norm, bin_mean, bin_std):
    if x.dim() == 3:
        n = (x.shape[1] // PATCH) * (x.shape[2] // PATCH)
        m = x.shape[0] * (index.shape[1] if index is not None else n)
    else:
        m = x.shape[0]
    return x.new_empty(m, codebooks.shape[0], dtype=torch.int64)


# ------------------------------------------------------------------------------------- public op
def _validate(x, projection, codebooks, index, norm="none", bin_mean=None, bin_std=None) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm == "bin":
        if x.dim() != 3:
            raise ValueError("norm='bin' needs the log-mel [B, F, T] (the patch rows do not say their mel bins)")
        if not (bin_mean is not None and bin_std is not None and bin_mean.shape == (x.shape[1],) == bin_std.shape):
            raise ValueError(f"norm='bin' needs bin_mean and bin_std of shape [{x.shape[1]}]")
        if checking(bin_std):
            if not bool((bin_std > 0).all()):
                raise ValueError("bin_std must be positive")
    check_tensor("x", x, dims=(2, 3), floating=True)
    check_tensor("projection", projection, dims=(3,), floating=True)
    check_tensor("codebooks", codebooks, dims=(3,), floating=True)
    same_device(x=x, projection=projection, codebooks=codebooks, index=index)
    c, k, d = codebooks.shape
    if projection.shape != (c, 256, d):
        raise ValueError(f"projection must be [C, 256, d] = [{c}, 256, {d}] to match codebooks "
                         f"{list(codebooks.shape)}, got {list(projection.shape)}")
    if not (k >= 1 and d >= 1):
        raise ValueError(f"codebooks must be non-empty, got {list(codebooks.shape)}")
    if not (projection.is_contiguous() and codebooks.is_contiguous()):
        raise ValueError("projection and codebooks must be contiguous")
    if x.dim() == 2:
        if x.shape[1] != 256:
            raise ValueError(f"raw patches must be [M, 256], got {list(x.shape)}")
        if index is not None:
            raise ValueError("index selects tokens of a log-mel batch [B, F, T]; with raw patches select rows first")
    else:
        if not (x.shape[1] % PATCH == 0 and x.shape[1] > 0):
            raise ValueError(f"log-mel batch [B, F, T] needs F a multiple of {PATCH}, got {list(x.shape)}")
        if not (x.shape[2] >= PATCH):
            raise ValueError(f"log-mel batch needs at least {PATCH} frames, got {x.shape[2]}")
    if index is not None:
        check_tensor("index", index, dims=(2,), integer=True)
        if index.shape[0] != x.shape[0]:
            raise ValueError(f"index must be [B, m] with B = {x.shape[0]}, got {list(index.shape)}")
        if checking(index) and index.numel():
            n = (x.shape[1] // PATCH) * (x.shape[2] // PATCH)
            lo, hi = int(index.min()), int(index.max())
            if not (lo >= 0 and hi < n):
                raise ValueError(f"index values must lie in [0, {n}), got [{lo}, {hi}]")


def rpq_codes(x: torch.Tensor, projection: torch.Tensor, codebooks: torch.Tensor,
              index: torch.Tensor | None = None, norm: str = "none", bin_mean: torch.Tensor | None = None,
              bin_std: torch.Tensor | None = None, impl: str | None = None) -> torch.Tensor:
    """int64 codes [M, C]; see the module docstring. ``norm``: the quantizer's input normalisation,
    "none" (the paper), "patch" (each patch standardised) or "bin" (the log-mel standardised per mel bin
    with ``bin_mean`` / ``bin_std`` [F]). ``impl`` auto | triton | reference (kernels._dispatch)."""
    _validate(x, projection, codebooks, index, norm, bin_mean, bin_std)
    if index is not None and index.shape[1] == 0:
        return torch.empty(0, codebooks.shape[0], dtype=torch.int64, device=x.device)
    if not use_triton(x, projection, codebooks, impl=impl):
        return rpq_codes_ref(x, projection, codebooks, index, norm, bin_mean, bin_std)
    if index is not None:
        index = index.contiguous()
    stats = (bin_mean.float().contiguous(), bin_std.float().contiguous()) if norm == "bin" else (None, None)
    return _rpq_codes_op(x, projection, codebooks, index, NORMS.index(norm), *stats)
