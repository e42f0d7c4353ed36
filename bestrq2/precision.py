"""Which dtype the encoder's matmuls run in: ``fp32``, ``bf16`` (autocast), or ``auto``.

``auto`` takes bf16 where the hardware runs it fast: on CUDA, and on CPUs with AMX or AVX512-BF16
(read from ``torch.cpu.get_capabilities()``); float32 elsewhere (bf16 emulated on a CPU without those
units is slower than float32). The log-mel frontend, the quantizer and the position tables always
stay float32; only the patch embedding and the transformer run in bf16.
"""
from __future__ import annotations

import logging

import torch

PRECISIONS = ("auto", "fp32", "bf16")
log = logging.getLogger(__name__)
_said: set[tuple[str, str]] = set()


def cpu_bf16_units() -> str | None:
    """"AMX" or "AVX512-BF16" when this CPU has them, else None."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        caps = {}
    if caps.get("amx_bf16"):
        return "AMX"
    if caps.get("avx512_bf16") or getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None


def resolve(precision: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None for float32, a sentence saying why)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None, "fp32 (asked)"
    if device.type == "cuda":
        return torch.bfloat16, f"bf16 ({'asked' if precision == 'bf16' else 'auto: CUDA'})"
    units = cpu_bf16_units()
    if precision == "bf16":
        return torch.bfloat16, "bf16 (asked" + ("" if units else "; this CPU has no AMX or AVX512-BF16: slow") + ")"
    if device.type == "cpu" and units:
        return torch.bfloat16, f"bf16 (auto: this CPU has {units})"
    return None, "fp32 (auto: no bf16 units on this device)"


def announce(precision: str, device: torch.device, what: str = "encoder") -> torch.dtype | None:
    """``resolve``, logging the choice once per (precision, device type)."""
    dtype, why = resolve(precision, device)
    key = (precision, device.type)
    if key not in _said:
        _said.add(key)
        log.info("bestrq2 %s precision: %s", what, why)
    return dtype
