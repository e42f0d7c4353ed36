"""End-to-end extras: where a step's time goes (``torch.profiler`` grouped by kind of work, idle
included), and variant (e), the real ``bestrq2 pretrain`` loop on prepared shards.

Profile categories, from CUDA kernel names: GEMM, attention, normalisation + elementwise, optimizer,
frontend (STFT / mel), custom ops (this project's Triton kernels), other; idle = the step's wall time
that no kernel covers (launch gaps, host work, syncs), from the union of kernel intervals.
"""
from __future__ import annotations

import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

CATEGORIES = ("gemm", "attention", "norm_elementwise", "optimizer", "frontend", "custom_ops", "other")
# first match wins; names are CUDA kernel names as the profiler reports them
_RULES = [
    ("custom_ops", r"_rpq_codes|_gather_tokens|_scatter_tokens|_ce_rows|_layer_norm_(fwd|bwd)|_bias_gelu|"
                   r"_scale_add|_attn_(fwd|bwd)|_attention_"),
    ("optimizer", r"adam|multi_tensor_apply|fused_adam"),
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*(mha|attn)"),
    ("frontend", r"fft|stft|vector_fft|regular_fft|mel"),
    ("gemm", r"gemm|cutlass|xmma|sm\d+_.*(h|s|bf16|tf32).*mma|cublas|matmul|nvjet"),
    ("norm_elementwise", r"layer_norm|elementwise|vectorized|reduce|gelu|softmax|copy|cat|index|scatter|gather|"
                         r"fill|where|add|mul|triton_"),
]


def categorize(kernel_name: str) -> str:
    low = kernel_name.lower()
    for cat, pattern in _RULES:
        if re.search(pattern, low):
            return cat
    return "other"


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def breakdown(kernels: list[tuple[str, float, float]], wall: float) -> dict[str, float]:
    """kernels (name, start, end) in any one time unit, wall = the steps' span in that unit ->
    share of the wall time per category plus ``idle`` (shares of kernel time are split by category in
    proportion to their summed durations, since overlapping streams would count twice)."""
    busy = _union_length([(a, b) for _, a, b in kernels])
    per = {c: 0.0 for c in CATEGORIES}
    for name, a, b in kernels:
        per[categorize(name)] += b - a
    summed = sum(per.values()) or 1.0
    out = {c: busy * v / summed / wall for c, v in per.items()}
    out["idle"] = max(0.0, 1.0 - busy / wall)
    return out


def profile_variant(var, steps: int = 3) -> dict[str, float]:
    """Shares of ``steps`` steps of a built ``e2e.Variant`` (CUDA only)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        var.time(steps)
        wall_us = (time.perf_counter() - t0) * 1e6
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start]
    return breakdown(kernels, wall_us)


def _prepared_corpus(root: Path, clips: int) -> Path:
    """``clips`` 10 s clips of the procedural corpus written straight into shards (``write_shards``: the
    same int16 shards ``bestrq2 prepare`` writes, without a decoder, so soundfile is not needed: the H200
    machine of 2026-11-26 had none)."""
    from bestrq2.data.shards import write_shards
    from bestrq2.data.synthetic import synth_clip

    return write_shards(((f"synth-{i:04d}", synth_clip(123, i, 10.0)) for i in range(clips)), root / "prepared")


def run_pretrain_loop(preset: str, batch: int, steps: int, warmup: int, compile: bool, clips: int = 64,
                      device: str = "auto") -> dict:
    """Variant (e): ``bestrq2.train.pretrain`` as a user runs it (prepared shards on disk, the default loader
    workers, masks drawn per step, metrics and the progress machinery on, no checkpoint before the end);
    clips/s is the median of its own per-step figures after ``warmup`` steps."""
    import csv

    from bestrq2.train import TrainConfig, pretrain

    with tempfile.TemporaryDirectory() as tmp:
        data = _prepared_corpus(Path(tmp), clips)
        tc = TrainConfig(preset=preset, steps=warmup + steps, batch_size=batch, data=str(data),
                         out=str(Path(tmp) / "run"), ckpt_every=10 ** 9, compile=compile,  # default loader workers
                         progress=False, device=device)
        res = pretrain(tc)
        rows = list(csv.DictReader(open(Path(tmp) / "run" / "metrics.csv")))
    rates = [float(r["clips_per_s"]) for r in rows[warmup:]]
    return dict(clips_per_s=statistics.median(rates), spread=(min(rates), max(rates)),
                loss=float(rows[-1]["loss"]), workers=res["loader_workers"])
