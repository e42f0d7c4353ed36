"""Which implementation runs, and the checks and launch helpers every op file shares.

Each op takes ``impl``: "auto" (the Triton path on CUDA tensors, the plain-PyTorch reference
elsewhere), "triton" (on any device; on CPU it needs ``TRITON_INTERPRET=1`` set before the kernels are
defined, as the tests do) or "reference". A model passes the implementation its config names
(``BestRQ2Config.kernels``, resolved once when the model is built); a direct call without ``impl``
takes ``BESTRQ2_KERNELS`` (default auto), read at that call.
"""
from __future__ import annotations

import torch

from ..config import KERNEL_CHOICES as CHOICES
from ..env import read


def backend(impl: str | None = None) -> str:
    """``impl``, or ``BESTRQ2_KERNELS`` when it is None; checked against auto | triton | reference."""
    v = impl if impl is not None else (read("BESTRQ2_KERNELS").lower() or "auto")
    if v not in CHOICES:
        raise ValueError(f"the implementation must be one of {CHOICES} (impl or BESTRQ2_KERNELS), got {v!r}")
    return v


def interpreting() -> bool:
    return read("TRITON_INTERPRET") == "1"


def use_triton(*tensors: torch.Tensor, impl: str | None = None) -> bool:
    """True when the Triton path should run for these inputs under ``impl`` (see ``backend``).
    float64 inputs always take the reference (the tests' exact-arithmetic runs that bound float32 error)."""
    b = backend(impl)
    if b == "reference" or any(t.dtype == torch.float64 for t in tensors):
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if b == "auto":
        return on_cuda
    if not on_cuda and not interpreting():
        raise ValueError("the Triton implementation on CPU tensors needs TRITON_INTERPRET=1 "
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
    v = read("BESTRQ2_CHECK", "auto").lower()
    if v in ("0", "off", "false"):
        return False
    if v in ("1", "on", "true"):
        return True
    return t is None or not t.is_cuda


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INTS = (torch.int32, torch.int64)


def check_tensor(name: str, t, *, dims: tuple[int, ...], floating: bool | None = None,
                 integer: bool = False) -> None:
    # the messages are formatted only on failure: each op checks its inputs at every call (~240 a training step)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape {list(t.shape)}")
    if floating and t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32, float16, bfloat16 (or float64, reference path only), "
                         f"got {t.dtype}")
    if integer and t.dtype not in _INTS:
        raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")


def same_device(**tensors: torch.Tensor) -> None:
    devices = [t.device for t in tensors.values() if t is not None]
    if any(d != devices[0] for d in devices[1:]):
        named = {n: t.device for n, t in tensors.items() if t is not None}
        raise ValueError(f"tensors on different devices: {named}")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b), triton.cdiv's formula (SymInts too). Not triton.cdiv itself: since triton 3.5 it is a
    ``constexpr_function``, ~5 us a host call, and the launchers size ~340 grids and blocks a training step."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, as triton.next_power_of_2 (whose host calls cost ~5 us, see ``cdiv``)."""
    if type(n) is int and n >= 1:
        return 1 << (n - 1).bit_length()
    import triton  # SymInts, n < 1: triton's own

    return triton.next_power_of_2(n)


def block_for(n: int, cap: int) -> int:
    """Power-of-two block >= 16, covering n up to cap."""
    return max(16, min(cap, next_power_of_2(max(1, n))))


def gpu_splits(programs: int, most: int, device: torch.device, env: str) -> int:
    """How many ways to split a kernel's serial loop (a batch sum, a codebook scan) so that its
    ``programs`` tiles become about 2 programs per SM; in [1, most]. 1 off the GPU and under the
    interpreter. The variable ``env`` forces the number (tests, tuning)."""
    forced = read(env)
    if forced:
        want = int(forced)
    elif device.type == "cuda" and not interpreting():
        want = -(-2 * torch.cuda.get_device_properties(device).multi_processor_count // programs)
    else:
        want = 1
    return max(1, min(want, most))


# ------------------------------------------------------------------ the token gather / scatter kernels
def token_blocks(rows: int, d: int) -> tuple[int, int]:
    """(rows, columns) per program of the token gather/scatter kernels: whole shapes under the interpreter."""
    if interpreting():
        return block_for(rows, 512), block_for(d, 1024)
    return 32, min(128, block_for(d, 128))


def batch_sum_grid(n: int, d: int, b: int, device: torch.device):
    """Blocks and grid of a backward kernel that sums over the batch: (BLOCK_N, BLOCK_D, N x D tiles,
    clips per program, batch slices). Slicing the batch lets a small tile count still fill the GPU
    (``gpu_splits``; ``BESTRQ2_BATCH_CHUNKS=n`` forces n); the slices' partial sums are added after."""
    bn, bd = token_blocks(n, d)
    tiles = (cdiv(n, bn), cdiv(d, bd))
    b_per = cdiv(b, gpu_splits(tiles[0] * tiles[1], b, device, "BESTRQ2_BATCH_CHUNKS"))
    return bn, bd, tiles, b_per, cdiv(b, b_per)


def inverse_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    """idx int [B, M] (unique per row) -> int32 [B, N]: inv[b, idx[b, i]] = i, else -1."""
    b, m = idx.shape
    inv = torch.full((b, n), -1, dtype=torch.int32, device=idx.device)
    src = torch.arange(m, dtype=torch.int32, device=idx.device).expand(b, m)
    return inv.scatter(1, idx.long(), src)
