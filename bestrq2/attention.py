"""One attention function for the encoder and predictor; which kernel runs is chosen here.

Backends, in order of preference on CUDA (``auto``): the ``flash_attn`` package (FlashAttention-2,
``flash_attn_func`` / ``flash_attn_varlen_func``), FlashAttention-4 (``flash_attn.cute``), then
PyTorch SDPA (which itself picks its flash or cuDNN kernel), except where ``attention_wins.json``
records that this project's Triton kernel beat SDPA on this card for the length, head dim, dtype and
pass (forward, or forward + backward when training): there ``auto`` takes ``triton``. On CPU: SDPA.
Also available when forced:
``math`` (scores written out, as the authors' code; the eager baseline) and ``triton`` (this project's
kernel, ``bestrq2.kernels.attention``; on CPU tensors it needs TRITON_INTERPRET=1).

Force one with the config's ``kernels["attention"]`` or the environment variable ``BESTRQ2_ATTENTION``
(the variable wins; ``BestRQ2Config.resolved`` folds it into the config when a model is built). A forced backend that cannot take the input raises ``ValueError``; ``auto`` falls
back to SDPA with a one-line warning. The choice is logged once per backend and kept on each
``Transformer`` as ``attention_backend``.

Ragged batches: backends with a varlen form (flash_attn, fa4, triton) get the valid tokens packed end
to end with ``cu_seqlens``; the others get a key-padding mask. Padding never attends or is attended.

On ``triton`` the model's ``Attention`` calls ``triton_qkv_attention`` below: the qkv linear runs without its
bias, which the kernels add, and the backward returns qkv's gradient as one tensor with the bias's (no stack
of three gradients, no bias-gradient pass; ``kernels.attention``).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ATTENTION as BACKENDS
from .kept import kept
from .kernels._dispatch import interpreting

log = logging.getLogger("bestrq2")
VARLEN = ("flash_attn", "fa4", "triton")
_logged: set[str] = set()
_warned: set[str] = set()


def _has(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def available() -> dict[str, bool]:
    """Which backends this machine has (CUDA ones need a GPU)."""
    cuda = torch.cuda.is_available()
    return {
        "flash_attn": cuda and _has("flash_attn"),
        "fa4": cuda and _has("flash_attn.cute"),
        "sdpa": True,
        "math": True,
        "triton": cuda or interpreting(),
    }


def _unsupported(name: str, x: torch.Tensor, head_dim: int, max_len: int) -> str | None:
    """Why ``name`` cannot run this input, or None."""
    if name in ("flash_attn", "fa4"):
        if not x.is_cuda:
            return "needs CUDA tensors"
        if not _has("flash_attn" if name == "flash_attn" else "flash_attn.cute"):
            return "is not installed (pip install bestrq2[flash])"
        if x.dtype not in (torch.float16, torch.bfloat16):
            return f"takes fp16/bf16, not {x.dtype} (train under bf16 autocast)"
        if head_dim % 8 or head_dim > 256:
            return f"takes head dims that are multiples of 8 up to 256, not {head_dim}"
    if name == "triton":
        if not x.is_cuda and not interpreting():
            return "on CPU tensors needs TRITON_INTERPRET=1"
        if head_dim > 128:
            return f"takes head dim <= 128, not {head_dim}"
        if max_len > 256:
            return f"is built for <= 256 tokens, not {max_len}"
    return None


# Measured on a GPU by ``python -m bench.gpu_probe --wins``: per card, the Triton kernel's time against
# SDPA's on the same data, forward alone and forward + backward, for sequences up to max_len tokens.
WINS_FILE = Path(__file__).with_name("attention_wins.json")
WIN_MARGIN = 1.05  # the Triton kernel must beat SDPA by 5% to be picked: not on noise
_wins_table: dict | None = None


def wins_table() -> dict:
    """{card name: [{"max_len", "head_dim", "dtype", "pass": "forward" | "train", "triton_over_sdpa", ...}]}."""
    global _wins_table
    if _wins_table is None:
        _wins_table = json.loads(WINS_FILE.read_text()) if WINS_FILE.is_file() else {}
    return _wins_table


def measured_winner(card: str, head_dim: int, max_len: int, dtype: torch.dtype, training: bool,
                    table: dict | None = None) -> str | None:
    """"triton" when the table holds a measurement on this card for this head dim and dtype, at the
    smallest measured length >= max_len, in which the Triton kernel beat SDPA by ``WIN_MARGIN``
    (forward + backward when training, forward alone otherwise); else None."""
    rows = [r for r in (wins_table() if table is None else table).get(card, [])
            if r["head_dim"] == head_dim and r["dtype"] == str(dtype).removeprefix("torch.")
            and r["pass"] == ("train" if training else "forward") and r["max_len"] >= max_len]
    if not rows:
        return None
    return "triton" if min(rows, key=lambda r: r["max_len"])["triton_over_sdpa"] >= WIN_MARGIN else None


def _triton_measured_faster(x: torch.Tensor, head_dim: int, max_len: int) -> bool:
    if torch.compiler.is_compiling() or not wins_table() or _unsupported("triton", x, head_dim, max_len):
        return False  # (under torch.compile SDPA stays: the table is read in eager code only)
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    card = torch.cuda.get_device_name(x.device)
    return measured_winner(card, head_dim, max_len, dtype, torch.is_grad_enabled()) == "triton"


def resolve(requested: str, x: torch.Tensor, head_dim: int, max_len: int) -> str:
    """The backend that will run for input x (any [.., D] activation) under ``requested``."""
    name = requested
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        why = _unsupported(name, x, head_dim, max_len)
        if why:
            raise ValueError(f"attention backend {name!r} (forced) {why}")
        chosen = name
    elif not x.is_cuda:
        chosen = "sdpa"
    else:
        chosen = "sdpa"
        for cand in ("flash_attn", "fa4"):
            if _has("flash_attn" if cand == "flash_attn" else "flash_attn.cute"):
                why = _unsupported(cand, x, head_dim, max_len)
                if why is None:
                    chosen = cand
                    break
                if cand not in _warned and not torch.compiler.is_compiling():
                    _warned.add(cand)
                    warnings.warn(f"bestrq2 attention: {cand} {why}; using sdpa", stacklevel=3)
        if chosen == "sdpa" and _triton_measured_faster(x, head_dim, max_len):
            chosen = "triton"  # where bench.gpu_probe measured this project's kernel ahead on this card
    if chosen not in _logged and not torch.compiler.is_compiling():  # a log call would break the graph
        _logged.add(chosen)
        log.info("bestrq2 attention backend: %s", chosen)
    return chosen


_CPU_BF16_SDPA: list[bool] = []


@torch.compiler.disable
def cpu_bf16_sdpa_works() -> bool:
    """Does PyTorch's CPU attention run bf16 here? On a CPU with AMX its flash kernel packs bf16 with a
    routine built only into ATen's AVX512 path; with ATen on a narrower one (``ATEN_CPU_CAPABILITY=default``
    or ``avx2``) it raises "pack_vnni2 is only supported when avx512 is supported" from 64 tokens on
    (torch 2.13). Probed once per process; where it fails, bf16 attention on the CPU runs in float32."""
    if not _CPU_BF16_SDPA:
        q = torch.zeros(1, 1, 64, 16, dtype=torch.bfloat16)
        try:
            F.scaled_dot_product_attention(q, q, q)
            _CPU_BF16_SDPA.append(True)
        except RuntimeError as err:
            log.info("bestrq2 attention: CPU bf16 SDPA fails here (%s); bf16 attention runs in float32", err)
            _CPU_BF16_SDPA.append(False)
    return _CPU_BF16_SDPA[0]


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str,
                    key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v [B, L, H, Dh] -> [B, L, H, Dh]; key_padding bool [B, L] (True = padding) or None."""
    b, n, h, d = q.shape
    if backend == "flash_attn" and key_padding is None:
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v)
    if backend == "fa4" and key_padding is None:
        from flash_attn.cute import flash_attn_func

        out = flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    if backend in VARLEN:
        return _as_varlen(lambda q, k, v, cu, m: varlen_attention(q, k, v, cu, m, backend), (q, k, v), key_padding)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, Dh]
    mask = None if key_padding is None else (~key_padding)[:, None, None, :]
    if backend == "sdpa":
        # on a CPU, bf16 runs in float32 where torch's kernel cannot run it, and where a gradient is wanted: its
        # bf16 backward is the slow one (forward + backward 20.8 ms against 10.9 in float32 at [8, 12, 64, 64],
        # 44.8 against 24.1 at 128 tokens, 2-core Xeon with AMX; the same error against float64)
        wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (qt, kt, vt))
        if qt.dtype == torch.bfloat16 and qt.device.type == "cpu" and (wants_grad or not cpu_bf16_sdpa_works()):
            with torch.autocast("cpu", enabled=False):  # (autocast would cast it back to bf16)
                out = F.scaled_dot_product_attention(qt.float(), kt.float(), vt.float(), attn_mask=mask)
            out = out.to(qt.dtype)
        else:
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    elif backend == "math":  # the authors' formulation: scores materialised, softmax, weighted sum
        scores = (qt * d ** -0.5) @ kt.transpose(-2, -1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out = scores.softmax(dim=-1) @ vt
    else:
        raise ValueError(f"unknown attention backend {backend!r}")
    return out.transpose(1, 2)


def triton_qkv_attention(qkv: torch.Tensor, bias: torch.Tensor | None, key_padding: torch.Tensor | None = None,
                         packed: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """The Triton backend on the qkv linear's packed output, its bias fused (``kernels.attention``):
    qkv [B, L, 3, H, Dh] -> [B, L, H, Dh] (key_padding bool [B, L], True = padding, or None), or packed
    tokens qkv [T, 3, H, Dh] -> [T, H, Dh] with ``packed = (cu_seqlens, max_seqlen)``. qkv comes from
    the linear *without* its bias; ``bias`` [3 H Dh] is that linear's (or None)."""
    from .kernels.attention import triton_qkv_attention as fused

    if packed is not None:
        return fused(qkv, bias, packed[0], packed[1])
    return _as_varlen(lambda qkv, cu, m: fused(qkv, bias, cu, m), (qkv,), key_padding)


_CU_SEQLENS: dict[tuple, torch.Tensor] = {}


def _equal_cu_seqlens(b: int, n: int, device: torch.device) -> torch.Tensor:
    """int32 [b + 1]: 0, n, 2 n, ..., b n, kept per (b, n, device) (``bestrq2.kept``): every attention of a
    step asks for the same one (16 ops a pretraining step, each a launch on a GPU)."""
    return kept(_CU_SEQLENS, (b, n, device), device,
                lambda: torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=device), most=64)


def _as_varlen(fn, xs: tuple[torch.Tensor, ...], key_padding: torch.Tensor | None) -> torch.Tensor:
    """A varlen attention ``fn(*packed xs, cu_seqlens, max_seqlen) -> [T, ...]`` on dense xs [B, L, ...]:
    equal lengths as [B*L, ...] views (no copy, no sync); with ``key_padding`` (True = padding) the valid
    tokens packed end to end and the output scattered back, zeros at the padding."""
    b, n = xs[0].shape[:2]
    if key_padding is None:
        out = fn(*(x.reshape(b * n, *x.shape[2:]) for x in xs), _equal_cu_seqlens(b, n, xs[0].device), n)
        return out.reshape(b, n, *out.shape[1:])
    valid = ~key_padding
    lengths = valid.sum(1)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    out = fn(*(x[valid] for x in xs), cu, int(lengths.max()))
    full = out.new_zeros(b, n, *out.shape[1:])
    full[valid] = out
    return full


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, backend: str) -> torch.Tensor:
    """Packed ragged batch: q, k, v [T, H, Dh], sequences at cu_seqlens [B + 1] -> [T, H, Dh]."""
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    if backend == "fa4":
        from flash_attn.cute import flash_attn_varlen_func

        out = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens)
        return out[0] if isinstance(out, tuple) else out
    if backend == "triton":
        from .kernels.attention import triton_attention

        return triton_attention(q, k, v, cu_seqlens, max_seqlen)
    raise ValueError(f"backend {backend!r} has no varlen form")
