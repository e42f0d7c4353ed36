"""End-to-end pretraining throughput at the paper's configuration (ViT-B, batch 256, 10 s clips,
frontend and quantizer on the device).

Variants: (a) eager fp32 built like the authors' code (scores written out, unfused head, reference
ops, ``torch.set_float32_matmul_precision("medium")`` as their training script sets it); (b) bf16
autocast + SDPA; (c) every fast path (auto attention, Triton gather/scatter/quantizer, fused head);
(d) (c) under torch.compile; and on request (``--variants``; ``gpu_session.sh plain`` runs it in a call of
its own) (b') ``b_plain_compile``: torch.compile of plain PyTorch ((b)'s model: reference ops, SDPA, bf16),
the baseline the hand-fused (c) has to beat, timed in the same rounds as (c) and (d)
(``ratio_vs_plain_compile``). MFU's FLOP count is ``bestrq2.flops.pretrain_step_flops`` (encoder on
visible tokens, predictor on all, head on masked, x3), divided by the bf16 matmul rate measured in the
same run and against the card's dense bf16 spec. All variants live in one process and are timed
interleaved, 3 repeats each (median, min-max); inputs come from pinned host memory through
``model.prepare``, as in the training loop, and the optimizer is fused AdamW on CUDA. (e) is the
real ``bestrq2 pretrain`` loop on prepared shards with the faster of (c)/(d)'s settings, and a
``torch.profiler`` breakdown per variant says where each step's time goes (``bench/e2e_extra.py``).
"""
from __future__ import annotations

import statistics
import time

import torch

from bestrq2 import BestRQ2, BestRQ2Config
from bestrq2.env import overridden
from bestrq2.flops import pretrain_step_flops

from .common import Recorder

PLAIN = {op: "reference" for op in ("rpq", "gather", "scatter", "head", "block")}
VARIANTS = {  # kernels: BestRQ2Config.kernels ("fast": every op on its Triton path, "auto" on CUDA)
    "a_eager_fp32": dict(kernels=PLAIN | {"attention": "math"}, bf16=False, compile=False),
    "b_bf16_sdpa": dict(kernels=PLAIN | {"attention": "sdpa"}, bf16=True, compile=False),
    "c_fast": dict(kernels="fast", bf16=True, compile=False),
    "d_fast_compile": dict(kernels="fast", bf16=True, compile=True),
    # torch.compile of plain PyTorch: what (c) must beat; opt-in, as its compile costs a GPU session ~1.5 min
    "b_plain_compile": dict(kernels=PLAIN | {"attention": "sdpa"}, bf16=True, compile=True),
}
DEFAULT_VARIANTS = ("a_eager_fp32", "b_bf16_sdpa", "c_fast", "d_fast_compile")


class Variant:
    """One variant's model, optimizer and step, built once; ``time(steps)`` runs and times steps. Every
    variant is fed as the training loop feeds it: a pinned host wave and a host mask through
    ``model.prepare`` (non-blocking copies), fused AdamW on CUDA (``make_optimizer``)."""

    def __init__(self, name: str, device, preset: str, batch: int) -> None:
        from bestrq2.train import TrainConfig, make_optimizer

        self.name, self.device, self.batch = name, device, batch
        self.v = v = VARIANTS[name]
        torch.manual_seed(0)
        # the Triton paths run interpreted in the CPU smoke check (their own "auto" would pick the references)
        fast = {} if device.type == "cuda" else {op: "triton" for op in PLAIN} | {"attention": "sdpa"}
        self.cfg = BestRQ2Config.preset(preset, kernels=fast if v["kernels"] == "fast" else v["kernels"])
        self.model = BestRQ2(self.cfg).to(device)
        self.opt = make_optimizer(self.model.parameters(), TrainConfig(lr=1e-4, weight_decay=0.05), device)
        wave = torch.randn(batch, 160_000) * 0.1
        self.wave = wave.pin_memory() if device.type == "cuda" else wave
        self.mask = torch.zeros(128, dtype=torch.bool)
        self.mask[torch.randperm(128)[:64]] = True
        # on a CPU (smoke checks only) through aot_eager: the variant's wiring, not inductor's C++ build (minutes)
        backend = "inductor" if device.type == "cuda" else "aot_eager"
        self.fwd = torch.compile(self.model, backend=backend) if v["compile"] else self.model
        self.out = None

    def step(self):
        v = self.v
        batch = self.model.prepare(self.wave, mask=self.mask)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=v["bf16"] and self.device.type == "cuda"):
            out = self.fwd(batch)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.out = out

    def time(self, steps: int) -> float:
        """Seconds per step over ``steps`` steps (device synchronised at both ends only)."""
        prec = torch.get_float32_matmul_precision()
        if self.name == "a_eager_fp32":
            torch.set_float32_matmul_precision("medium")
        try:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                self.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - t0) / steps
        finally:
            torch.set_float32_matmul_precision(prec)


def bench_e2e(rec: Recorder, device, bounds, smoke: bool, variants=None, repeats: int | None = None,
              with_loop: bool = True) -> dict:
    """All variants in one process, built once, then timed interleaved (a b c d, a b c d, ...) so drift
    and clock changes hit them alike; median and spread over the repeats."""
    preset, batch, steps, warmup = ("tiny", 2, 2, 1) if smoke else ("base", 256, 5, 3)
    repeats = repeats or (1 if smoke else 3)
    shape = f"preset={preset},B={batch},10s"
    if variants is None:  # smoke runs skip torch.compile (compiling is what takes the time)
        variants = [v for v in DEFAULT_VARIANTS if not (smoke and VARIANTS[v]["compile"])]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown e2e variants {unknown}; known: {', '.join(VARIANTS)} (and e_pretrain_loop)")
    built = {name: Variant(name, device, preset, batch) for name in variants}
    for var in built.values():
        var.time(warmup)  # compiles, autotunes, fills caches
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times: dict[str, list[float]] = {name: [] for name in built}
    # (c) once more per round with every Triton op call through the torch.library dispatcher (the short eager
    # path off, kernels._op): what that path saves a step on the card's host
    via_dispatcher: list[float] = []
    for _ in range(repeats):
        for name, var in built.items():
            times[name].append(var.time(steps))
            if name == "c_fast":
                with overridden("BESTRQ2_EAGER_OPS", "0"):
                    via_dispatcher.append(var.time(steps))
    res = {}
    peak_all = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    for name, var in built.items():
        ts = sorted(times[name])
        med = statistics.median(ts)
        r = dict(step_s=med, clips_per_s=batch / med, spread=(batch / ts[-1], batch / ts[0]),
                 flops=pretrain_step_flops(var.cfg, batch, 128, 64), loss=float(var.out.loss),
                 # encoder (the visible tokens) / predictor (all 128): auto may pick differently for the two lengths
                 backend="/".join(str(t.attention_backend) for t in (var.model.encoder, var.model.predictor)
                                  if t is not None))
        res[name] = r
        rec.add("pretrain_step", name, "full", shape, "clips_per_s", r["clips_per_s"])
        rec.add("pretrain_step", name, "full", shape, "clips_per_s_min", r["spread"][0])
        rec.add("pretrain_step", name, "full", shape, "clips_per_s_max", r["spread"][1])
        rec.add("pretrain_step", name, "full", shape, "step_ms", 1e3 * med)
        mfu = r["flops"] / med / (bounds["matmul_tflops"] * 1e12)
        rec.add("pretrain_step", name, "full", shape, "mfu_vs_measured_matmul", mfu)
        spec = _spec_peak(device)
        if spec:
            rec.add("pretrain_step", name, "full", shape, "mfu_vs_spec_bf16", r["flops"] / med / spec)
        print(f"  {name:16s} {r['clips_per_s']:9.1f} clips/s (median of {repeats}; {r['spread'][0]:.1f}-"
              f"{r['spread'][1]:.1f})  MFU {100 * mfu:5.1f}% of measured matmul  attention={r['backend']}"
              f"  loss={r['loss']:.3f}")
    if via_dispatcher:
        med = statistics.median(via_dispatcher)
        rec.add("pretrain_step", "c_fast_dispatcher", "full", shape, "clips_per_s", batch / med)
        rec.add("pretrain_step", "c_fast", "full", shape, "ratio_vs_dispatcher", med / res["c_fast"]["step_s"])
        print(f"  c_fast through the torch.library dispatcher: {batch / med:9.1f} clips/s "
              f"(the short eager path: {med / res['c_fast']['step_s']:.3f}x)")
    if "b_plain_compile" in res:  # the hand-fused path (and compile on top of it) against compiled plain PyTorch
        for name in ("c_fast", "d_fast_compile"):
            if name in res:
                ratio = res[name]["clips_per_s"] / res["b_plain_compile"]["clips_per_s"]
                rec.add("pretrain_step", name, "full", shape, "ratio_vs_plain_compile", ratio)
                print(f"  {name} / b_plain_compile (torch.compile of plain PyTorch): {ratio:.3f}x")
    if peak_all is not None:
        rec.add("pretrain_step", "all_variants", "full", shape, "peak_mem_bytes", peak_all)
    if device.type == "cuda":  # where the time goes, per variant (committed as rows: op "step_profile")
        from .e2e_extra import profile_variant

        for name, var in built.items():
            shares = {name: profile_variant(var)}  # as the environment says (gpu_session.sh may turn the path off)
            if name == "c_fast":
                with overridden("BESTRQ2_EAGER_OPS", "0"):
                    shares[f"{name}_dispatcher"] = profile_variant(var)
            for label, by_cat in shares.items():
                for cat, share in by_cat.items():
                    rec.add("step_profile", label, "full", shape, f"share_{cat}", share)
                print(f"  profile {label:16s} " + "  ".join(f"{c} {100 * v:4.1f}%" for c, v in by_cat.items()))
    if with_loop:  # (e): the real training loop on prepared shards, as fast as the best of (c)/(d)?
        from .e2e_extra import run_pretrain_loop

        best = max((n for n in res if n in ("c_fast", "d_fast_compile")), key=lambda n: res[n]["clips_per_s"],
                   default="c_fast")
        try:
            e = run_pretrain_loop(preset, batch, steps=2 if smoke else 10, warmup=1 if smoke else 5,
                                  compile=best == "d_fast_compile", clips=4 if smoke else 64,
                                  device=device.type)
        except Exception as err:  # (a)-(d) are measured: report (e)'s failure and keep the rest of the piece
            if smoke:
                raise
            print(f"  e_pretrain_loop FAILED: {type(err).__name__}: {err}")
            e = None
        if e is not None:
            res["e_pretrain_loop"] = e
            rec.add("pretrain_step", "e_pretrain_loop", "full", shape, "clips_per_s", e["clips_per_s"])
            rec.add("pretrain_step", "e_pretrain_loop", "full", shape, "clips_per_s_min", e["spread"][0])
            rec.add("pretrain_step", "e_pretrain_loop", "full", shape, "clips_per_s_max", e["spread"][1])
            rec.add("pretrain_step", "e_pretrain_loop", "full", shape, "step_ms", 1e3 * batch / e["clips_per_s"])
            if best in res:
                rec.add("pretrain_step", "e_pretrain_loop", "full", shape, f"ratio_vs_{best}",
                        e["clips_per_s"] / res[best]["clips_per_s"])
            rec.add("pretrain_step", "e_pretrain_loop", "full", shape, "loader_workers", e["workers"])
            print(f"  e_pretrain_loop  {e['clips_per_s']:9.1f} clips/s (median; {e['spread'][0]:.1f}-{e['spread'][1]:.1f})"
                  f"  compile={best == 'd_fast_compile'}  loader workers {e['workers']}  loss={e['loss']:.3f}")
    if "a_eager_fp32" in res:
        for name, r in res.items():
            rec.add("pretrain_step", name, "full", shape, "speedup_vs_a", r["clips_per_s"] / res["a_eager_fp32"]["clips_per_s"])
    return res


def _spec_peak(device) -> float | None:
    """The card's dense bf16 spec (H100/H200 SXM: 989 TFLOP/s), for MFU against a fixed peak."""
    if device.type != "cuda":
        return None
    from bestrq2.train_log import peak_flops as _peak_flops

    return _peak_flops(device)
