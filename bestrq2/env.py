"""Every environment variable bestrq2 reads, and the one function that reads them.

The variables are overrides for a run, not configuration: what they choose is resolved once (when a
model is built, when a kernel is launched without an explicit ``impl``) and, for the per-op
implementations, recorded in the saved config. The README's table "Environment variables" lists the
same names (a test keeps the two in step, and another that nothing else in the package reads
``os.environ``).
"""
from __future__ import annotations

import os
from contextlib import contextmanager

VARIABLES: dict[str, str] = {
    "BESTRQ2_KERNELS": "auto | triton | reference: overrides the config's rpq, gather, scatter, head and block "
                       "implementations (auto: Triton on CUDA tensors, the PyTorch reference elsewhere)",
    "BESTRQ2_ATTENTION": "auto | flash_attn | fa4 | sdpa | math | triton: overrides the config's attention backend",
    "BESTRQ2_CHECK": "auto | 1 | 0: data-dependent index checks (auto: on CPU tensors only, as they sync a GPU)",
    "BESTRQ2_EAGER_OPS": "1 | 0: eager calls of the Triton ops skip the torch.library dispatcher (0: every call "
                         "through it, to compare)",
    "BESTRQ2_ATTN_CFG": "bm,bn,warps,stages: the Triton attention's tile and launch config (tuning sweeps)",
    "BESTRQ2_BATCH_CHUNKS": "n: batch slices of the gather/scatter backward's batch sum (tuning, tests)",
    "BESTRQ2_RPQ_SPLIT": "n: codebook splits of the RPQ kernel (tuning, tests)",
    "BESTRQ2_RPQ_CFG": "block_m,block_k,warps: the RPQ kernel's tiles and warps (tuning sweeps)",
    "BESTRQ2_COMMIT": "the commit the benchmarks record (when the tree on the GPU machine is not a git checkout)",
    "TRITON_INTERPRET": "1: run the Triton kernels on the CPU through Triton's interpreter (set before import)",
    "RANK": "set by torchrun: this process's rank",
    "WORLD_SIZE": "set by torchrun: the number of processes",
    "LOCAL_RANK": "set by torchrun: this process's GPU on its node",
    "LD_LIBRARY_PATH": "extended, not replaced, for the text-to-speech tools that build the tts_digits eval task",
    "ATEN_CPU_CAPABILITY": "read, not set: ATen's CPU vector path (default | avx2 | avx512); torch.compile then "
                           "caches its CPU kernels in a folder of their own (inductor_cache_per_isa)",
    "TORCHINDUCTOR_CACHE_DIR": "torch.compile's cache folder: set by inductor_cache_per_isa where "
                               "ATEN_CPU_CAPABILITY is set and this is not",
}


def _known(name: str) -> None:
    if name not in VARIABLES:
        raise KeyError(f"{name} is not one of bestrq2's environment variables (bestrq2.env.VARIABLES)")


# ``os.environ.get`` of an unset name costs ~2 us (a KeyError raised and caught inside the Mapping), and the ops
# read a few names at each call: ~400 reads a training step, ~1 ms of the host's time in one that the card runs in
# ~40. So ``read`` looks in the dict ``os.environ`` keeps underneath (CPython's ``_data``, keyed and valued as it
# encodes them: every write through ``os.environ`` lands there), and in ``os.environ`` itself where that is missing.
try:
    _DATA, _DECODE = os.environ._data, os.environ.decodevalue  # type: ignore[attr-defined]
    _KEYS = {name: os.environ.encodekey(name) for name in VARIABLES}  # type: ignore[attr-defined]
except AttributeError:  # another os.environ: the slow path below
    _DATA, _KEYS = None, {}


def read(name: str, default: str = "") -> str:
    """The variable's value, stripped (``default`` when unset or blank). Only the names above."""
    key = _KEYS.get(name)
    if key is None or _DATA is None:
        _known(name)
        return os.environ.get(name, "").strip() or default
    raw = _DATA.get(key)
    return default if raw is None else (_DECODE(raw).strip() or default)


@contextmanager
def overridden(name: str, value: str):
    """``name`` set to ``value`` for the block (benchmarks' and checks' tuning sweeps), then restored,
    unset again if it was unset. Only the names above."""
    _known(name)
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def inductor_cache_per_isa() -> str | None:
    """Give torch.compile a cache folder of its own for each ``ATEN_CPU_CAPABILITY`` (call before compiling).

    Inductor's CPU code depends on that variable (it vectorises for the ISA it names; ``default``: not at all),
    but its on-disk caches are not keyed by it (torch 2.13): after a run under AVX512, a run under
    ``ATEN_CPU_CAPABILITY=default`` reuses the vectorised C++ source and compiles it without the vector
    headers ("'at::vec' has not been declared"). Where the variable is set and ``TORCHINDUCTOR_CACHE_DIR``
    is unset or inductor's default, this sets the latter to that default plus ``_aten_<capability>`` and
    returns it; otherwise (a folder the user chose, or no capability set) it changes nothing and returns None.
    Inductor reads the variable at each cache access, so this works after torch._dynamo is imported."""
    capability = read("ATEN_CPU_CAPABILITY").lower()
    if not capability:
        return None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # importing torch._dynamo writes inductor's default folder into the variable, so only another value is the user's
    chosen, default = read("TORCHINDUCTOR_CACHE_DIR"), default_cache_dir()
    if chosen and os.path.abspath(chosen) != os.path.abspath(default):
        return None
    folder = f"{default}_aten_{capability}"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder
