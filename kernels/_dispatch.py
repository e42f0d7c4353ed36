"""Which implementation runs: ``BESTRQ2_KERNELS=triton|reference|auto`` (default auto).

auto: the Triton path on CUDA tensors, the plain-PyTorch reference elsewhere. ``triton`` forces the
Triton path on any device (on CPU it needs ``TRITON_INTERPRET=1`` set before the kernels are defined,
as the tests do). The variable is read at each call, so tests can switch it with monkeypatch.
"""
from __future__ import annotations

import contextlib
import os

import torch

CHOICES = ("auto", "triton", "reference")


def backend() -> str:
    v = os.environ.get("BESTRQ2_KERNELS", "auto").strip().lower() or "auto"
    if v not in CHOICES:
        raise ValueError(f"BESTRQ2_KERNELS must be one of {CHOICES}, got {v!r}")
    return v


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed code with ``BESTRQ2_KERNELS=name`` (then restore it): e.g. "reference" to trace
    plain PyTorch ops (ONNX export) or to benchmark the reference path."""
    if name not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {name!r}")
    old = os.environ.get("BESTRQ2_KERNELS")
    os.environ["BESTRQ2_KERNELS"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("BESTRQ2_KERNELS", None)
        else:
            os.environ["BESTRQ2_KERNELS"] = old


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton path should run for these inputs. float64 inputs always take the
    reference (the tests' exact-arithmetic runs that bound float32 error)."""
    b = backend()
    if b == "reference" or any(t.dtype == torch.float64 for t in tensors):
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if b == "auto":
        return on_cuda
    if not on_cuda and not interpreting():
        raise ValueError("BESTRQ2_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 "
                         "(set before bestrq2 is imported)")
    return True


def checking(t: torch.Tensor | None = None) -> bool:
    """Whether to run the data-dependent checks (index ranges, uniqueness) on ``t``.

    Never while torch.compile traces. On CPU tensors always. On CUDA tensors only with
    ``BESTRQ2_CHECK=1``: each check reads a value back to the host, a device sync that stalls the
    launch queue (on an H200 it cost the gather/scatter/RPQ fast paths ~0.3 ms a call, more than the
    kernels themselves). ``BESTRQ2_CHECK=0`` turns them off everywhere."""
    if torch.compiler.is_compiling():
        return False
    v = os.environ.get("BESTRQ2_CHECK", "auto").strip().lower()
    if v in ("0", "off", "false"):
        return False
    if v in ("1", "on", "true"):
        return True
    return t is None or not t.is_cuda


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_tensor(name: str, t, *, dims: tuple[int, ...], floating: bool | None = None,
                 integer: bool = False) -> None:
    need(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    need(t.dim() in dims, f"{name} must have {' or '.join(map(str, dims))} dims, got shape {list(t.shape)}")
    if floating:
        need(t.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64),
             f"{name} must be float32, float16, bfloat16 (or float64, reference path only), got {t.dtype}")
    if integer:
        need(t.dtype in (torch.int32, torch.int64), f"{name} must be int32 or int64, got {t.dtype}")


def same_device(**tensors: torch.Tensor) -> None:
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    need(len(set(devs.values())) <= 1, f"tensors on different devices: {devs}")


def block_for(n: int, cap: int) -> int:
    """Power-of-two block >= 16, covering n up to cap."""
    import triton

    return max(16, min(cap, triton.next_power_of_2(max(1, n))))


def gpu_splits(programs: int, most: int, device: torch.device, env: str) -> int:
    """How many ways to split a kernel's serial loop (a batch sum, a codebook scan) so that its
    ``programs`` tiles become about 2 programs per SM; in [1, most]. 1 off the GPU and under the
    interpreter. The variable ``env`` forces the number (tests, tuning)."""
    forced = os.environ.get(env, "").strip()
    if forced:
        want = int(forced)
    elif device.type == "cuda" and not interpreting():
        want = -(-2 * torch.cuda.get_device_properties(device).multi_processor_count // programs)
    else:
        want = 1
    return max(1, min(want, most))
