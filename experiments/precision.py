"""Does CPU bf16 change what the encoder's features say? Scores of one encoder in fp32 and in bf16 on the
built-in tasks, compared clip by clip (paired bootstrap), plus the frames' difference.

    python experiments/precision.py --model ENCODER_DIR [--tasks a,b] [--out experiments/results]

Runs ``bestrq2 eval --builtin --precision fp32`` and ``--precision bf16`` (the same probe, seeds and
test clips), then writes OUT/precision.md and precision.json: per task and overall, each precision's
probe and kNN accuracy with 95% intervals, and the paired difference bf16 - fp32 with its interval.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tasks", default=None)
    ap.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = ap.parse_args(argv)
    from bestrq2 import BestRQ2Encoder
    from bestrq2.cli import main as cli
    from bestrq2.eval.stats import accuracy_ci, paired_difference
    from bestrq2.precision import cpu_bf16_units

    args.out.mkdir(parents=True, exist_ok=True)
    runs, secs = {}, {}
    for prec in ("fp32", "bf16"):
        t0 = time.time()
        rep = args.out / f"precision-{prec}.md"
        argv_ = ["eval", "--builtin", "--model", args.model, "--precision", prec, "--out", str(rep), "--no-progress"]
        if args.tasks:
            argv_ += ["--tasks", args.tasks]
        if cli(argv_) != 0:
            return 2
        secs[prec] = time.time() - t0
        runs[prec] = json.loads(rep.with_suffix(".json").read_text())
        rep.unlink()
        rep.with_suffix(".json").unlink()
    enc = BestRQ2Encoder.from_pretrained(args.model)
    wave = torch.randn(8, 160_000, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.no_grad():
        ref = enc.set_precision("fp32")(wave)
        low = enc.set_precision("bf16")(wave)
    frame_abs = float((low - ref).abs().max())
    frame_rel = frame_abs / float(ref.abs().max())
    tasks = [t["task"] for t in runs["fp32"]["tasks"]]
    rows = {}
    for kind in ("probe", "knn"):
        key = f"model/{kind}"
        hits = {p: [torch.tensor(t["hits"][key]) for t in runs[p]["tasks"]] for p in runs}
        for i, name in enumerate(tasks + ["overall"]):
            sel = slice(i, i + 1) if name != "overall" else slice(None)
            rows.setdefault(name, {})[kind] = {
                "fp32": accuracy_ci(hits["fp32"][sel]), "bf16": accuracy_ci(hits["bf16"][sel]),
                "bf16_minus_fp32": paired_difference(hits["bf16"][sel], hits["fp32"][sel])}
    units = cpu_bf16_units() or "none"
    lines = ["# CPU bf16 vs fp32: the same encoder's scores on the built-in tasks", "",
             f"Encoder `{args.model}`; command `python experiments/precision.py --model {args.model}`; CPU bf16 units: "
             f"{units}; eval wall time fp32 {secs['fp32'] / 60:.1f} min, bf16 {secs['bf16'] / 60:.1f} min (features of "
             "3 encoders: model, random init, log-mel floor). Frames of 8 random 10 s clips, bf16 vs fp32: max abs "
             f"difference {frame_abs:.3g}, relative to the largest value {frame_rel:.3g}.", "",
             "Test accuracy in % [95% bootstrap interval]; paired difference bf16 - fp32 over the same test clips.", "",
             "| task | probe fp32 | probe bf16 | probe bf16 − fp32 | kNN fp32 | kNN bf16 | kNN bf16 − fp32 |",
             "|---|---|---|---|---|---|---|"]

    def c(v):
        return f"{100 * v[0]:.1f} [{100 * v[1]:.1f}, {100 * v[2]:.1f}]"

    def d(v):
        return f"{100 * v[0]:+.1f} [{100 * v[1]:+.1f}, {100 * v[2]:+.1f}]"

    for name, r in rows.items():
        lines.append(f"| {name} | {c(r['probe']['fp32'])} | {c(r['probe']['bf16'])} | {d(r['probe']['bf16_minus_fp32'])} "
                     f"| {c(r['knn']['fp32'])} | {c(r['knn']['bf16'])} | {d(r['knn']['bf16_minus_fp32'])} |")
    (args.out / "precision.md").write_text("\n".join(lines) + "\n")
    (args.out / "precision.json").write_text(json.dumps({"frames": {"max_abs": frame_abs, "max_rel": frame_rel},
                                                         "eval_seconds": secs, "rows": rows}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
