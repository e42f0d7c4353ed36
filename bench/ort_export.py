"""The ONNX exports under onnxruntime against PyTorch's fast fp32 encoder on a CPU, interleaved in one process
(issue #19's onnxruntime >= 1.0x target): the default export (onnxruntime's Attention op) and the portable one
(standard ops), the default one also with ``OnnxEncoder(split_batches=True)`` ("split": a batch cut into one
sub-batch per thread, each run single-threaded), and optionally older export files, each run back to back with the PyTorch encoder
on the same batch.

``python -m bench.ort_export [--preset base] [--batch 1 8] [--rounds 8] [--extra OLD.onnx ...] [--files F ...]``
prints per batch the wall time per clip of each (median and minimum over rounds, the order reversed every other
round) and the paired ratio PyTorch / export of each round (median): above 1.0x the export is faster. Needs the
``onnx`` extra.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ort_export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--extra", nargs="*", default=[], help="more ONNX files of the same encoder to time (e.g. an "
                    "older export; their weights need not match, only their shape)")
    ap.add_argument("--files", nargs="+", help="time these ONNX files instead of exporting the default and the "
                    "portable graph afresh")
    args = ap.parse_args(argv)
    from bestrq2 import BestRQ2Config, BestRQ2Encoder
    from bestrq2.onnx import OnnxEncoder

    threads = torch.get_num_threads()
    torch.manual_seed(0)
    enc = BestRQ2Encoder(BestRQ2Config.preset(args.preset), precision="fp32", cuda_graphs="off").eval()
    tmp = Path(tempfile.mkdtemp())
    runs = {"pytorch fast fp32": lambda w: enc(torch.from_numpy(w))}
    if not args.files:
        for name, portable in (("onnx default", False), ("onnx portable", True)):
            runs[name] = OnnxEncoder(enc.to_onnx(tmp / f"{name.split()[1]}.onnx", portable=portable), threads=threads)
        # the same file with a batch cut into one sub-batch per thread (OnnxEncoder's split_batches)
        runs["onnx default, split"] = OnnxEncoder(runs["onnx default"].path, threads=threads, split_batches=True)
    for path in [*(args.files or []), *args.extra]:
        runs[Path(path).name] = OnnxEncoder(path, threads=threads)
    print(f"{args.preset} encoder, {threads} threads, torch {torch.__version__}; wall ms per clip, "
          f"{args.rounds} rounds interleaved")
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        for b in args.batch:
            wave = (rng.standard_normal((b, 160_000)) * 0.1).astype(np.float32)
            for fn in runs.values():
                fn(wave)
            ms: dict[str, list[float]] = {k: [] for k in runs}
            for r in range(args.rounds):
                for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                    t0 = time.perf_counter()
                    runs[k](wave)
                    ms[k].append(1e3 * (time.perf_counter() - t0) / b)
            base = ms["pytorch fast fp32"]
            for k, v in ms.items():
                ratio = "" if k == "pytorch fast fp32" else \
                    f"  pytorch / this {statistics.median(a / c for a, c in zip(base, v)):.3f}x"
                print(f"  B={b:<3d} {k:22s} median {statistics.median(v):7.1f}  min {min(v):7.1f}{ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
