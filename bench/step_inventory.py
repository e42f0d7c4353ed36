"""python -m bench.step_inventory [--batch 4 16] [--at 256] [--bandwidth 4240]: where one pretraining step's
memory traffic goes, counted on a machine without a GPU.

One step of the fast path (forward under bf16 autocast, backward; every op on its Triton path, the launches
recorded and not run, as in ``bench.gpu_compile``) runs under a dispatch mode that logs every ATen and custom
op with the bytes its tensors hold (inputs + outputs; views and allocations count nothing). Ops are grouped
as GEMM, custom (the Triton ops: their traffic is the kernels' own), and eager (everything else: casts,
adds, the frontend's FFT, reductions). Each op's bytes are fitted as a + b * batch over two batch sizes
and read at ``--at`` clips, with the time they take at ``--bandwidth`` GB/s (read + write; the H200's
measured copy bound was 4,240). It is a count, not a profile: the CPU runs the CPU's autocast and the
fitted line ignores cache reuse, so read the sizes, not the times, and confirm them on the card.
"""
from __future__ import annotations

import argparse
import collections

GEMM = {"mm", "addmm", "bmm", "baddbmm", "linear"}
NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach",
              "alias", "_reshape_alias", "_unsafe_view", "unflatten", "unbind", "split", "split_with_sizes"}


def step_ops(batch: int, preset: str) -> dict[tuple, list[int]]:
    """{(phase, kind, op, dtype): [calls, bytes, FLOPs (GEMMs)]} of one step at this batch (fwd / bwd)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from bestrq2 import BestRQ2, BestRQ2Config
    from bestrq2.config import OPS

    def held(xs) -> int:
        return sum(t.numel() * t.element_size() for t in xs if isinstance(t, torch.Tensor))

    ops: dict[tuple, list[int]] = collections.defaultdict(lambda: [0, 0, 0])

    def gemm_flops(ins) -> int:  # 2 M K N (x batch) from the last two matrices
        a, b = [t for t in ins if isinstance(t, torch.Tensor) and t.dim() >= 2][-2:]
        n = b.shape[-2] if b.shape[-1] == a.shape[-1] and a.shape[-1] != b.shape[-2] else b.shape[-1]
        return 2 * a.shape[-2] * a.shape[-1] * n * (a.shape[0] if a.dim() == 3 else 1)

    class Log(TorchDispatchMode):
        phase = "fwd"

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            ins, outs = tree_flatten((args, kwargs))[0], tree_flatten(out)[0]
            moved = 0 if (func.is_view or name in NO_TRAFFIC) else held(ins) + held(outs)
            first = next((t for t in outs if isinstance(t, torch.Tensor)), None)
            kind = "GEMM" if name in GEMM else ("custom" if func.namespace == "bestrq2" else "eager")
            key = (self.phase, kind, f"{func.namespace}::{name}", str(first.dtype)[6:] if first is not None else "")
            ops[key][0] += 1
            ops[key][1] += moved
            ops[key][2] += gemm_flops(ins) if kind == "GEMM" else 0
            return out

    torch.manual_seed(0)
    model = BestRQ2(BestRQ2Config.preset(preset, kernels={op: "triton" for op in OPS}))
    step = model.prepare(torch.rand(batch, 160_000) * 0.2 - 0.1)
    log = Log()
    with log:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.forward_batch(step)
        log.phase = "bwd"
        out.loss.float().backward()
    return ops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs=2, default=[4, 16], help="the two batch sizes the line is fitted to")
    ap.add_argument("--at", type=int, default=256, help="clips per step to read the fit at")
    ap.add_argument("--preset", default="base")
    ap.add_argument("--bandwidth", type=float, default=4240.0, help="GB/s (read + write) for the time column")
    ap.add_argument("--tflops", type=float, default=782.0, help="bf16 matmul rate for the GEMMs' time column "
                    "(the H200's measured 782)")
    ap.add_argument("--top", type=int, default=15, help="eager ops listed")
    args = ap.parse_args(argv)
    from bestrq2.env import read

    if read("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the Triton launches are recorded, not interpreted")
        return 2
    from bench.gpu_compile import record_launches

    launches = record_launches()
    (b0, b1), at = args.batch, args.at
    runs = [step_ops(b, args.preset) for b in (b0, b1)]

    def fit(key) -> tuple[int, float, float]:  # (calls, bytes, FLOPs) at `at` clips
        (n0, y0, f0), (_, y1, f1) = runs[0].get(key, [0, 0, 0]), runs[1].get(key, [0, 0, 0])
        line = lambda v0, v1: max(0.0, v0 + (v1 - v0) / (b1 - b0) * (at - b0))  # noqa: E731
        return n0, line(y0, y1), line(f0, f1)

    fitted = {k: fit(k) for k in sorted(set(runs[0]) | set(runs[1]))}
    print(f"{args.preset} step, {len(launches)} Triton launches recorded at batch {b1}; fitted over batch {b0} "
          f"and {b1}, read at {at}. ms: bytes at {args.bandwidth:,.0f} GB/s, GEMMs at {args.tflops:g} TFLOP/s")
    print(f"{'kind':7s} {'phase':5s} {'calls':>6s} {'GB':>8s} {'TFLOP':>7s} {'ms':>7s}")
    totals: dict[tuple, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
    for (phase, kind, _, _), values in fitted.items():
        for i, v in enumerate(values):
            totals[(kind, phase)][i] += v
    for (kind, phase), (n, b, f) in sorted(totals.items()):
        ms = f / 1e9 / args.tflops if kind == "GEMM" else b / 1e6 / args.bandwidth
        print(f"{kind:7s} {phase:5s} {int(n):6d} {b / 1e9:8.3g} {f / 1e12:7.3g} {ms:7.3g}")
    eager = sum(b for (k, _), (_, b, _) in totals.items() if k == "eager")
    print(f"eager total: {eager / 1e9:.2f} GB, {eager / 1e6 / args.bandwidth:.2f} ms at {args.bandwidth:,.0f} GB/s")
    for kind in ("eager", "custom"):
        print(f"largest {kind} ops at batch {at}:")
        top = sorted(((b, k, n) for k, (n, b, _) in fitted.items() if k[1] == kind), reverse=True)[: args.top]
        for b, (phase, _, op, dtype), n in top:
            print(f"  {phase:4s} {op:40s} {dtype:9s} x{int(n):4d} {b / 1e9:7.2f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
