"""python -m bench.host_overhead [--depth 12 --predictor-depth 4] [--width 16] [--steps 20]: the host's share of one
pretraining step of the fast path (variant (c) of ``bench.e2e``), timed on a machine without a GPU.

Why: at the #15 target (6,000 clips/s at 256 clips) a ViT-B step has ~42 ms on the card. Without compile or CUDA
graphs the host must queue every op of the step in less than that, or the card waits (the e2e profile's
"idle"). What that queueing costs does not depend on the tensors' sizes, so it can be timed here: the paper's
depths (12 + 4 blocks) at a narrow width, one clip and a small codebook, so that the CPU's own arithmetic is small, with
every Triton launch recorded, not run (``bench.gpu_compile.record_launches``: the launchers do all their host
work up to the launch itself). Each step is ``model.prepare`` + forward under bf16 autocast + backward + fused
AdamW + ``zero_grad``, as (c) runs it, with the data checks off as on CUDA.

Printed: ms of host time per step (median and spread over ``--steps``), the ATen ops dispatched and the Triton
launches per step, the arithmetic the CPU still did (GEMM / FFT time from the profiler, subtracted), and what
the launches would add at a stated per-launch cost (the Triton launcher's own C path, not timed here). It is an
estimate: a CUDA op's dispatch also pays the driver's launch (a few µs), which no CPU op does, and the card's
host is another CPU. The e2e profile on the card is the measurement.
"""
from __future__ import annotations

import argparse
import statistics
import time


def _step_fn(depth: int, predictor_depth: int, width: int, heads: int, clips: int, codes: int):
    import torch

    from bestrq2 import BestRQ2, BestRQ2Config
    from bestrq2.config import OPS
    from bestrq2.train import TrainConfig

    torch.manual_seed(0)
    cfg = BestRQ2Config.preset("base", encoder_depth=depth, predictor_depth=predictor_depth, encoder_dim=width,
                               predictor_dim=width, encoder_heads=heads, predictor_heads=heads, codebook_size=codes,
                               kernels={op: "triton" for op in OPS})
    model = BestRQ2(cfg)
    tc = TrainConfig(lr=1e-4, weight_decay=0.05)
    # fused, as make_optimizer gives CUDA: one multi-tensor kernel per step
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
    wave = torch.randn(clips, 160_000) * 0.1
    mask = torch.zeros(128, dtype=torch.bool)
    mask[torch.randperm(128)[:64]] = True

    def step(marks: list[float] | None = None):
        """One step; ``marks`` gets the clock after prepare, forward, backward and the optimizer."""
        mark = marks.append if marks is not None else (lambda _t: None)
        batch = model.prepare(wave, mask=mask)
        mark(time.perf_counter())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.forward_batch(batch)
        mark(time.perf_counter())
        out.loss.float().backward()
        mark(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark(time.perf_counter())

    return step


def _ready_step(depth: int, predictor_depth: int, width: int, heads: int, clips: int, codes: int):
    """(the list the Triton launches are recorded into, a warmed-up step function)."""
    import torch

    from bench.gpu_compile import record_launches

    launches = record_launches()
    # the recorded kernels leave their outputs unwritten: garbage that is often denormal, which x86 arithmetic
    # runs up to 100x slower (the CPU's GEMMs took 191 ms a step on it instead of 31 at width 64)
    torch.set_flush_denormal(True)
    step = _step_fn(depth, predictor_depth, width, heads, clips, codes)
    for _ in range(3):  # warm-up: caches, the optimizer's state
        step()
    return launches, step


PHASES = ("prepare", "forward", "backward", "optimizer")
# ATen ops that only make views or allocate (no kernel on a GPU); an ``aten::to`` computes when it copies
NO_KERNEL = {"aten::reshape", "aten::empty", "aten::t", "aten::detach", "aten::select", "aten::view", "aten::flatten",
             "aten::unflatten", "aten::empty_like", "aten::promote_types", "aten::slice", "aten::expand",
             "aten::is_nonzero", "aten::item", "aten::unsqueeze", "aten::transpose", "aten::as_strided",
             "aten::_unsafe_view", "aten::permute", "aten::empty_strided", "aten::alias", "aten::unbind",
             "aten::split", "aten::squeeze", "aten::_reshape_alias", "aten::numpy_T", "aten::view_as_real"}


def computing_ops(prof) -> dict[str, int]:
    """{op name: calls} of a profiled step's top-level ATen ops (not inside another ATen op) that compute: each
    at least one kernel on a GPU (a ``linear`` more: its weight cast under autocast and the GEMM)."""
    counts: dict[str, int] = {}
    for e in prof.events():
        if not e.name.startswith("aten::") or (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")):
            continue
        copies = any(c.name == "aten::_to_copy" for c in e.cpu_children)
        if e.name in NO_KERNEL or (e.name == "aten::to" and not copies):
            continue
        counts[e.name] = counts.get(e.name, 0) + 1
    return counts


HEAVY = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_fft_r2c", "aten::_fused_adamw_", "aten::_scaled_dot_product")


def measure(depth: int = 12, predictor_depth: int = 4, width: int = 16, heads: int = 4, clips: int = 1,
            codes: int = 256, steps: int = 20, profiled_steps: int = 5) -> dict:
    """The fast path's step with its launches recorded: {"wall_ms": [per unprofiled step], "phase_ms" (medians),
    "aten_ops", "profiled_wall_ms": [per profiled step], "heavy_ms": [per profiled step], "heavy_ops", "host_ms"};
    heavy = the CPU's own arithmetic (GEMMs, FFT, AdamW: ``HEAVY``), its self time in each profiled step;
    host_ms = the median over the profiled steps of (wall - heavy): never negative, and an upper bound, since the
    profiler's own recording is in it."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from bestrq2.env import overridden

    launches, step = _ready_step(depth, predictor_depth, width, heads, clips, codes)
    wall, phases = [], []
    for _ in range(steps):
        marks = [time.perf_counter()]
        step(marks)
        wall.append(1e3 * (marks[-1] - marks[0]))
        phases.append([1e3 * (b - a) for a, b in zip(marks, marks[1:])])

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    before = len(launches)
    with Count():
        step()
    per_step_launches = len(launches) - before
    calls, dispatched = _op_calls(step)
    with overridden("BESTRQ2_EAGER_OPS", "0"):
        _, dispatched_off = _op_calls(step)
    # the arithmetic is taken out of the same steps it was timed in: a profiled step's wall minus its own heavy
    # self time. (The median of unprofiled walls minus one profiled step's arithmetic went negative on a busy CI
    # host, where that one step's GEMMs ran slower than the steps timed before it.)
    prof_wall, heavy_ms, heavy_ops = [], [], 0
    for _ in range(max(1, profiled_steps)):
        with torch.profiler.profile() as prof:
            t0 = time.perf_counter()
            step()
            prof_wall.append(1e3 * (time.perf_counter() - t0))
        heavy = [e for e in prof.key_averages() if e.key.startswith(HEAVY)]
        heavy_ms.append(sum(e.self_cpu_time_total for e in heavy) / 1e3)
        heavy_ops = sum(e.count for e in heavy)
    return {"computing": computing_ops(prof), "wall_ms": wall,
            "phase_ms": {name: statistics.median(p[i] for p in phases) for i, name in enumerate(PHASES)},
            "aten_ops": Count.n, "launches": per_step_launches, "op_calls": calls,
            "op_dispatched": dispatched, "op_dispatched_off": dispatched_off, "profiled_wall_ms": prof_wall,
            "heavy_ms": heavy_ms, "heavy_ops": heavy_ops,
            "host_ms": statistics.median(w - h for w, h in zip(prof_wall, heavy_ms))}


def compare_eager(pairs: int = 20, depth: int = 12, predictor_depth: int = 4, width: int = 16, heads: int = 4,
                  clips: int = 1, codes: int = 256) -> dict:
    """Steps with the ops' short eager path and through the dispatcher (``BESTRQ2_EAGER_OPS`` 1 / 0), alternated
    (ABBA) in one process: {"1": [ms], "0": [ms], "ratio": [per pair, 1 / 0]}."""
    from bestrq2.env import overridden

    _, step = _ready_step(depth, predictor_depth, width, heads, clips, codes)
    runs: dict = {"1": [], "0": []}
    for i in range(pairs):
        for v in ("1", "0") if i % 2 == 0 else ("0", "1"):
            with overridden("BESTRQ2_EAGER_OPS", v):
                t0 = time.perf_counter()
                step()
                runs[v].append(1e3 * (time.perf_counter() - t0))
    runs["ratio"] = [a / b for a, b in zip(runs["1"], runs["0"])]
    return runs


def _op_calls(step) -> tuple[int, int]:
    """(calls of the Triton ops, calls of them that went through the torch.library dispatcher) in one step:
    each ``kernels._op.FastOp``'s registered op wrapped with a counter (no dispatch mode, which would itself
    send every call through the dispatcher)."""
    import sys

    from bestrq2.kernels._op import FastOp

    ops = {id(v): v for m in list(sys.modules.values()) if m and getattr(m, "__name__", "").startswith("bestrq2.kernels")
           for v in vars(m).values() if isinstance(v, FastOp)}.values()
    counts = [0, 0]

    def counted(real, slot):
        def call(*args, **kwargs):
            counts[slot] += 1
            return real(*args, **kwargs)
        return call

    saved = {op: op.op for op in ops}
    call = FastOp.__call__
    try:
        for op in ops:
            op.op = counted(op.op, 1)
        FastOp.__call__ = counted(call, 0)
        step()
    finally:
        FastOp.__call__ = call
        for op, real in saved.items():
            op.op = real
    return counts[0], counts[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--predictor-depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=16, help="narrow, so that the CPU's arithmetic is small")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--clips", type=int, default=1)
    ap.add_argument("--codes", type=int, default=256, help="codebook size (the head's GEMM; 8,192 in the paper)")
    ap.add_argument("--dispatch-us", type=float, default=10.0,
                    help="host cost put back for each GEMM / FFT / AdamW op (a cuBLAS launch, not the CPU's math)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profiled-steps", type=int, default=5,
                    help="steps run under the profiler, whose CPU arithmetic is taken out of their own wall time")
    ap.add_argument("--launch-us", type=float, nargs="+", default=[5.0, 15.0, 30.0],
                    help="per-launch costs to add for the Triton launches (not timed here)")
    ap.add_argument("--budget-ms", type=float, default=256 / 6000 * 1e3,
                    help="the card's step time to compare with (#15's (c) target: 256 clips at 6,000 clips/s)")
    ap.add_argument("--compare", type=int, metavar="PAIRS", default=0,
                    help="instead: PAIRS steps each with the ops' short eager path and through the torch.library "
                         "dispatcher (BESTRQ2_EAGER_OPS=1 / 0), alternated in one process")
    args = ap.parse_args(argv)
    from bestrq2.env import read

    if read("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the Triton launches are recorded, not interpreted")
        return 2
    if args.compare:
        c = compare_eager(args.compare, args.depth, args.predictor_depth, args.width, args.heads, args.clips,
                          args.codes)
        for v, what in (("1", "short eager path"), ("0", "through the dispatcher")):
            print(f"  {what:24s} median {statistics.median(c[v]):6.1f} ms, min {min(c[v]):6.1f} ms per step")
        print(f"  paired ratio (short / dispatcher): median {statistics.median(c['ratio']):.3f} over {args.compare} pairs")
        return 0
    r = measure(args.depth, args.predictor_depth, args.width, args.heads, args.clips, args.codes, args.steps,
                args.profiled_steps)
    w = sorted(r["wall_ms"])
    med = statistics.median(w)
    host = r["host_ms"] + r["heavy_ops"] * args.dispatch_us / 1e3
    import platform

    import torch

    print(f"fast-path step (prepare, forward under bf16 autocast, backward, fused AdamW), {args.depth} + "
          f"{args.predictor_depth} blocks at width {args.width}, {args.clips} clip(s), {args.codes} codes; torch "
          f"{torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"  wall per step: median {med:.1f} ms (min {w[0]:.1f}, max {w[-1]:.1f}) over {len(w)} steps")
    print("  by phase (medians, CPU arithmetic included): " + ", ".join(f"{k} {v:.1f} ms" for k, v in r["phase_ms"].items()))
    print(f"  profiled: {len(r['heavy_ms'])} more steps, wall median {statistics.median(r['profiled_wall_ms']):.1f} ms (the "
          f"profiler's recording included), CPU arithmetic in them ({r['heavy_ops']} GEMM / FFT / AdamW ops a step, "
          f"self time): median {statistics.median(r['heavy_ms']):.1f} ms, taken out of each step's own wall; "
          f"{args.dispatch_us:g} us put back for each op")
    print(f"  host work: {host:.1f} ms for {r['aten_ops']} ATen ops and {r['launches']} Triton launches "
          f"(recorded, not run; the profiler's recording included, so an upper bound)")
    top = sorted(r["computing"].items(), key=lambda kv: -kv[1])
    print(f"  ATen ops that compute (top level, a kernel each on a GPU): {sum(r['computing'].values())}: "
          + ", ".join(f"{n.removeprefix('aten::')} {c}" for n, c in top[:8]))
    print(f"  Triton op calls: {r['op_calls']}, of which through the torch.library dispatcher: {r['op_dispatched']} "
          f"(BESTRQ2_EAGER_OPS={read('BESTRQ2_EAGER_OPS') or '1'}); {r['op_dispatched_off']} with "
          "BESTRQ2_EAGER_OPS=0")
    for us in args.launch_us:
        total = host + r["launches"] * us / 1e3
        print(f"  + the launches at {us:g} us each: {total:.1f} ms = {100 * total / args.budget_ms:.0f}% of a "
              f"{args.budget_ms:.1f} ms step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
