"""Encoder inference throughput: clips/s and ms per 10 s clip at batch 1 and 64.

eager: the authors' formulation (attention scores written out, float32). fast: SDPA in
``torch.inference_mode`` (CPU), plus bf16 autocast and the best attention backend on CUDA. On CPU the
two are timed alternately (one run each per round) so that a shared machine's drift hits both alike.
Both run the same weights; the max abs difference of their frames is recorded ("equal outputs").
"""
from __future__ import annotations

import statistics
import time

import torch

from bestrq2 import BestRQ2Config, BestRQ2Encoder

from .common import Recorder, time_fn


def _quantiles(ms: list[float]) -> tuple[float, float, float]:
    v = sorted(ms)
    pick = lambda p: v[min(len(v) - 1, int(p * (len(v) - 1) + 0.5))]  # noqa: E731
    return statistics.median(v), pick(0.2), pick(0.8)


def bench_inference(rec: Recorder, device, smoke: bool, preset: str | None = None) -> None:
    preset = preset or ("tiny" if smoke else "base")
    batches = [1, 2] if smoke else [1, 64]
    torch.manual_seed(0)
    eager = BestRQ2Encoder(BestRQ2Config.preset(preset, attention="math")).to(device).eval()
    fast = BestRQ2Encoder(BestRQ2Config.preset(preset, attention="auto")).to(device).eval()
    fast.load_state_dict(eager.state_dict())
    for b in batches:
        wave = torch.randn(b, 160_000, device=device) * 0.1
        shape = f"preset={preset},B={b},10s"

        def run_fast():
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                return fast(wave)

        def run_eager():
            with torch.no_grad():
                return eager(wave)

        diff = (run_fast().float() - run_eager()).abs().max().item()
        reps = 1 if smoke else (3 if (b > 1 and device.type == "cpu") else 10)
        if device.type == "cuda":
            stats = {name: time_fn(fn, device, reps=reps, warmup=1) for name, fn in (("eager", run_eager), ("fast", run_fast))}
        else:  # interleave the two on CPU so drifts of a shared machine hit both alike
            runs = {"eager": [], "fast": []}
            for _ in range(reps):
                for name, fn in (("eager", run_eager), ("fast", run_fast)):
                    t0 = time.perf_counter()
                    fn()
                    runs[name].append(1e3 * (time.perf_counter() - t0))
            stats = {k: _quantiles(v) for k, v in runs.items()}
        t = {}
        for name in ("eager", "fast"):
            med, p20, p80 = stats[name]
            t[name] = med
            rec.add("encoder_inference", name, "forward", shape, "time_ms", med)
            rec.add("encoder_inference", name, "forward", shape, "time_p20_ms", p20)
            rec.add("encoder_inference", name, "forward", shape, "time_p80_ms", p80)
            rec.add("encoder_inference", name, "forward", shape, "clips_per_s", 1e3 * b / med)
            rec.add("encoder_inference", name, "forward", shape, "ms_per_clip", med / b)
        rec.add("encoder_inference", "fast", "forward", shape, "speedup_vs_eager", t["eager"] / t["fast"])
        rec.add("encoder_inference", "fast", "forward", shape, "max_abs_diff_vs_eager", diff)
        print(f"  encoder B={b}: eager {t['eager']:.1f} ms, fast {t['fast']:.1f} ms "
              f"({t['eager'] / t['fast']:.2f}x), max |diff| {diff:.2e}")
