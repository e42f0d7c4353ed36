"""Does training in bf16 on a CPU change the encoder? Two pretraining runs from the same seed, float32 and
``--precision bf16``, compared by their loss curves and, clip by clip, by their scores on the built-in tasks.

    python experiments/train_precision.py [--runs DIR] [--steps 500] [--cache EVAL_CACHE] [--out experiments/results]

Runs ``bestrq2 pretrain --preset tiny --steps N --batch-size 8 --precision P --out DIR/P`` for P in fp32, bf16
(each skipped where DIR/P/encoder exists), then ``bestrq2 eval --builtin --model DIR/bf16/encoder --baseline
DIR/fp32/encoder --precision fp32`` (both encoders' features in float32: only the training precision differs;
skipped where its report exists), and writes OUT/train_precision.md: wall time of each run, the per-step loss
difference, and the paired score difference bf16-trained - fp32-trained per task, domain and overall.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/train_precision"))
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--cache", default=None, help="built-in eval tasks' cache (default ~/.cache/bestrq2/eval)")
    ap.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = ap.parse_args(argv)
    from bestrq2.cli import main as cli
    from bestrq2.precision import cpu_bf16_units

    walls = {}
    for prec in ("fp32", "bf16"):
        run = args.runs / prec
        if (run / "encoder").is_dir():
            walls[prec] = None  # an earlier run's: its time is in that run's log, not here
            continue
        t0 = time.time()
        if cli(["pretrain", "--preset", "tiny", "--steps", str(args.steps), "--batch-size", "8", "--precision", prec,
                "--out", str(run), "--overwrite", "--no-progress"]) != 0:
            raise SystemExit(f"pretrain --precision {prec} failed")
        walls[prec] = time.time() - t0
    report = args.runs / "report.md"
    if not report.with_suffix(".json").is_file():
        argv_ = ["eval", "--builtin", "--model", str(args.runs / "bf16" / "encoder"), "--baseline",
                 str(args.runs / "fp32" / "encoder"), "--precision", "fp32", "--out", str(report), "--no-progress"]
        if args.cache:
            argv_ += ["--cache", args.cache]
        if cli(argv_) != 0:
            raise SystemExit("eval failed")
    losses = {p: [float(r["loss"]) for r in csv.DictReader(open(args.runs / p / "metrics.csv"))] for p in walls}
    diffs = [abs(a - b) for a, b in zip(losses["fp32"], losses["bf16"])]
    paired = json.loads(report.with_suffix(".json").read_text())["paired"]["model-baseline"]
    pct = lambda v: f"{100 * v[0]:+.1f} [{100 * v[1]:+.1f}, {100 * v[2]:+.1f}]"  # noqa: E731
    lines = ["# CPU training in bf16 against float32: the same seed, two runs", "",
             f"`python experiments/train_precision.py --runs {args.runs} --steps {args.steps}`; tiny preset, batch 8, "
             f"CPU bf16 units: {cpu_bf16_units()}. Wall time of each run: "
             + ", ".join(f"{p} {'(earlier run)' if w is None else f'{w:.0f} s'}" for p, w in walls.items()) + ".", "",
             f"Loss per step: largest |bf16 - fp32| {max(diffs):.4f} (step {diffs.index(max(diffs)) + 1}), mean "
             f"{statistics.mean(diffs):.4f}; mean over the last 50 steps fp32 {statistics.mean(losses['fp32'][-50:]):.3f}, "
             f"bf16 {statistics.mean(losses['bf16'][-50:]):.3f}.", "",
             "Paired difference of test accuracy, bf16-trained − fp32-trained encoder, in points [95% bootstrap "
             "interval] (features of both in float32; logistic probe and kNN of `bestrq2 eval`):", "",
             "| scope | probe | kNN |", "|---|---|---|"]
    lines += [f"| {scope} | {pct(d['probe'])} | {pct(d['knn'])} |" for scope, d in paired.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
