"""onnxruntime's float32 GEMM (MLAS) against PyTorch's ``F.linear`` and oneDNN's prepacked linear (the encoder's
fast fp32 path on a CPU) on ViT-B's linear shapes: why the exported encoder trails PyTorch's fast fp32 path at
batch 8 on a CPU (issue #19).

``python -m bench.ort_gemm [--rows 1024] [--rounds 5] [--reps 5] [--in-process]`` prints GFLOP/s per shape and
provider (median over rounds) and onnxruntime's ratio to the faster torch one. By default each round runs each
provider in a process of its own (the order reversed every other round): in one process the runtime that ran
last leaves its worker threads spinning for a while (onnxruntime's pool, OpenMP's), and on a 2-core host they
took a core from the next one's GEMM (2026-12-03, 2 threads: oneDNN 90-100 GFLOP/s after onnxruntime, 175-185
alone). ``--in-process`` times them back to back in one process, as before. Needs the ``onnx`` extra.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from bestrq2.precision import packed_linear_available

SHAPES = {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)}  # (K in, N out)


def _ort_gemm(k: int, n: int, threads: int):
    """An ONNX model of one Gemm (weights as an initializer, transB=1, with bias) -> run(x) callable."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    b = np.zeros(n, np.float32)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1)], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString(),
                                opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0], torch.from_numpy(w), torch.from_numpy(b)


def _rate(fn, flop: float, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return flop * reps / (time.perf_counter() - t) / 1e9


def _providers(k: int, n: int, rows: int, threads: int) -> dict:
    """Callables running [rows, k] x [k, n] (+ bias) per provider."""
    run, w, b = _ort_gemm(k, n, threads)
    x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
    xt = torch.from_numpy(x)
    calls = {"onnxruntime": lambda: run(x), "F.linear": lambda: F.linear(xt, w, b)}
    if packed_linear_available(torch.float32):  # what the encoder's fast fp32 path runs on a CPU
        wp = torch.ops.mkldnn._reorder_linear_weight(w, 1024)
        calls["oneDNN packed"] = lambda: torch.ops.mkldnn._linear_pointwise(xt, wp, b, "none", [], "")
    return calls


def _in_child(provider: str, rows: int, reps: int) -> None:
    """One provider alone in this process: a line 'shape GFLOP/s' per shape (none where it is unavailable)."""
    threads = torch.get_num_threads()
    for name, (k, n) in SHAPES.items():
        fn = _providers(k, n, rows, threads).get(provider)
        if fn is not None:
            print(name, _rate(fn, 2.0 * rows * k * n, reps))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ort_gemm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1024, help="rows (tokens): 1,024 = 8 clips of 128 patches")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5, help="calls per provider per round")
    ap.add_argument("--in-process", action="store_true", help="all providers in this process, back to back")
    ap.add_argument("--provider", help=argparse.SUPPRESS)  # the child's job: time this provider alone
    args = ap.parse_args(argv)
    if args.provider:
        _in_child(args.provider, args.rows, args.reps)
        return 0
    threads = torch.get_num_threads()
    where = "back to back in one process" if args.in_process else "each provider in its own process"
    print(f"rows {args.rows}, {threads} threads, torch {torch.__version__}; GFLOP/s, median of {args.rounds} rounds, "
          f"{where}")
    # in one process every shape's sessions and packed weights are built once, before the rounds
    calls = {s: _providers(k, n, args.rows, threads) for s, (k, n) in SHAPES.items()} if args.in_process else None
    names = list(calls["proj"] if calls else _providers(*SHAPES["proj"], 1, threads))
    rates = {s: {p: [] for p in names} for s in SHAPES}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        if calls:
            for shape, (k, n) in SHAPES.items():
                for p in order:
                    rates[shape][p].append(_rate(calls[shape][p], 2.0 * args.rows * k * n, args.reps))
            continue
        for p in order:
            out = subprocess.run([sys.executable, "-m", "bench.ort_gemm", "--provider", p, "--rows", str(args.rows),
                                  "--reps", str(args.reps)], capture_output=True, text=True, check=True).stdout
            for line in out.splitlines():
                shape, rate = line.split()
                rates[shape][p].append(float(rate))
    for name, (k, n) in SHAPES.items():
        med = {p: statistics.median(v) for p, v in rates[name].items()}
        best_torch = max(v for p, v in med.items() if p != "onnxruntime")
        print(f"  {name:5s} [{args.rows}, {k}] x [{k}, {n}]: " + "  ".join(f"{p} {v:6.1f}" for p, v in med.items())
              + f"  ratio onnxruntime / best torch {med['onnxruntime'] / best_torch:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
