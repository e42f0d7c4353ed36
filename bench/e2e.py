"""End-to-end pretraining throughput at the paper's configuration (ViT-B, batch 256, 10 s clips,
frontend and quantizer on the device).

Variants: (a) eager fp32 built like the authors' code (scores written out, unfused head, reference
ops, ``torch.set_float32_matmul_precision("medium")`` as their training script sets it); (b) bf16
autocast + SDPA; (c) every fast path (auto attention, Triton gather/scatter/quantizer, fused head);
(d) (c) under torch.compile. MFU's FLOP count is ``bestrq2.flops.pretrain_step_flops`` (encoder on
visible tokens, predictor on all, head on masked, x3), divided by the bf16 matmul rate measured in the
same run.
"""
from __future__ import annotations

import contextlib
import os
import time

import torch

from bestrq2 import BestRQ2, BestRQ2Config
from bestrq2.flops import pretrain_step_flops

from .common import Recorder

VARIANTS = {
    "a_eager_fp32": dict(attention="math", fused_head=False, kernels="reference", bf16=False, compile=False),
    "b_bf16_sdpa": dict(attention="sdpa", fused_head=False, kernels="reference", bf16=True, compile=False),
    "c_fast": dict(attention="auto", fused_head=True, kernels="auto", bf16=True, compile=False),
    "d_fast_compile": dict(attention="auto", fused_head=True, kernels="auto", bf16=True, compile=True),
}


@contextlib.contextmanager
def _env(**kv):
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update({k: v for k, v in kv.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_variant(name: str, device, preset: str, batch: int, steps: int, warmup: int):
    v = VARIANTS[name]
    torch.manual_seed(0)
    cfg = BestRQ2Config.preset(preset, attention=v["attention"], fused_head=v["fused_head"])
    model = BestRQ2(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    wave = torch.randn(batch, 160_000, device=device) * 0.1
    mask = torch.zeros(128, dtype=torch.bool)
    mask[torch.randperm(128)[:64]] = True
    mask = mask.to(device)
    fwd = torch.compile(model) if v["compile"] else model
    prec = torch.get_float32_matmul_precision()
    if name == "a_eager_fp32":
        torch.set_float32_matmul_precision("medium")
    try:
        with _env(BESTRQ2_KERNELS=v["kernels"]):
            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=v["bf16"] and device.type == "cuda"):
                    out = fwd(wave, mask=mask)
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return out

            for _ in range(warmup):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(steps):
                out = step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / steps
            peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
            backend = model.encoder.attention_backend
    finally:
        torch.set_float32_matmul_precision(prec)
    flops = pretrain_step_flops(cfg, batch, 128, 64)
    return dict(step_s=dt, clips_per_s=batch / dt, flops=flops, peak=peak, loss=float(out.loss), backend=backend)


def bench_e2e(rec: Recorder, device, bounds, smoke: bool, variants=None) -> dict:
    preset, batch, steps, warmup = ("tiny", 2, 2, 1) if smoke else ("base", 256, 10, 3)
    shape = f"preset={preset},B={batch},10s"
    res = {}
    if variants is None:  # smoke runs skip torch.compile (compiling is what takes the time)
        variants = [v for v in VARIANTS if not (smoke and VARIANTS[v]["compile"])]
    for name in variants:
        r = run_variant(name, device, preset, batch, steps, warmup)
        res[name] = r
        rec.add("pretrain_step", name, "full", shape, "clips_per_s", r["clips_per_s"])
        rec.add("pretrain_step", name, "full", shape, "step_ms", 1e3 * r["step_s"])
        mfu = r["flops"] / r["step_s"] / (bounds["matmul_tflops"] * 1e12)
        rec.add("pretrain_step", name, "full", shape, "mfu_vs_measured_matmul", mfu)
        if r["peak"] is not None:
            rec.add("pretrain_step", name, "full", shape, "peak_mem_bytes", r["peak"])
        print(f"  {name:16s} {r['clips_per_s']:9.1f} clips/s  MFU {100 * mfu:5.1f}%  attention={r['backend']}"
              f"  loss={r['loss']:.3f}")
    if "a_eager_fp32" in res:
        for name, r in res.items():
            rec.add("pretrain_step", name, "full", shape, "speedup_vs_a", r["clips_per_s"] / res["a_eager_fp32"]["clips_per_s"])
    return res
