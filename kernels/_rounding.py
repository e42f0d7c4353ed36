"""Rounding helpers shared by kernels."""
import triton
import triton.language as tl


@triton.jit
def round_to_bf16_rtne(x):
    """float32 -> float32 holding the nearest bfloat16 (ties to even), so the following ``.to(bf16)``
    is exact on every backend. (Triton's CPU interpreter truncates on that cast; CUDA rounds to
    nearest: with this both agree.) Finite inputs only; inf stays inf."""
    bits = x.to(tl.int32, bitcast=True)
    bias = 0x7FFF + ((bits >> 16) & 1)
    rounded = (bits + bias) & -65536  # clear the low 16 bits (0xFFFF0000)
    return rounded.to(tl.float32, bitcast=True)
