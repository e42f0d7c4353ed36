"""Constant tensors a step would otherwise rebuild each time (the sincos table, equal-length cu_seqlens),
kept per key once built: each rebuild is a few ops, each a launch on a GPU, for the same values."""
from __future__ import annotations

from typing import Callable

import torch


def kept(cache: dict, key: tuple, device: torch.device, build: Callable[[], torch.Tensor],
         most: int = 16) -> torch.Tensor:
    """``build()``, kept in ``cache`` under ``key`` (which should name ``device``). Built afresh, not kept:
    while torch.compile traces (the graph computes it inline) and while a CUDA graph is captured (the
    kernels only run at replay: a tensor kept from capture would hold garbage for eager calls). Built
    outside inference mode and autograd, so that a table first asked for by an evaluation can serve
    training later. Past ``most`` keys the cache is emptied (clip lengths an evaluation runs through)."""
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return build()
    value = cache.get(key)
    if value is None:
        if len(cache) >= most:
            cache.clear()
        with torch.inference_mode(False), torch.no_grad():
            value = cache[key] = build()
    return value
