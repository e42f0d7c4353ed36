"""The claim retested on real audio with normalised targets (issue 18): two-step vs one-stage x the
quantizer's input normalisation (``rpq_norm`` none, the paper's, vs patch [vs bin]), 3 seeds each, pretrained
on the Debian corpus (``bestrq2 prepare --debian default CORPUS``), scored on the built-in tasks with the
logistic probe and standardised kNN (95% bootstrap intervals; paired differences pooled over seeds).

    bestrq2 prepare --debian default ~/corpus-debian            # once: fetch and decode the packages
    python experiments/retest.py --corpus ~/corpus-debian         # runs/retest, experiments/results/retest.*
    python experiments/retest.py --corpus C --steps 2 --seeds 0 --tasks ufoai_sfx --limit 4 \\
        --out /tmp/retest --results /tmp/retest                   # a smoke run

Runs go seed by seed (every configuration of seed 0 first), each a resumable ``bestrq2 pretrain``
subprocess in OUT/<mode>-<norm>-s<seed>: an interrupted script continues where it stopped, and a partial
set of seeds is reported as such. Writes RESULTS/retest.md, retest.json and retest.png.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from bestrq2.eval.experiment import (aggregate, experiment_args, finished, floors, mean_std, pooled_paired,
                                     pretrain_stats, run_dir, run_pretrain, save_figure, score_builtin)

MODES = {"two_step": [], "one_stage": ["--one-stage"]}
PRETEXT = ("loss", "accuracy", "code_perplexity", "codes_used")  # metrics.csv columns of the pretext table


def configs(args) -> list[str]:
    return [f"{mode}-{norm}" for norm in args.norms for mode in MODES]


def flags(args, name: str) -> list[str]:
    mode, norm = name.rsplit("-", 1)
    return [*MODES[mode], "--rpq-norm", norm, "--data", str(args.corpus)]


def evaluate(args, seed: int) -> dict | None:
    """Every configuration's encoder of this seed and the floors, cached in OUT/eval-s<seed>.json; None
    until all of the seed's runs are finished. A cache that lacks some configurations (a norm added
    later) gets only those scored and merged in: each encoder's scores do not depend on the others'."""
    path = args.out / f"eval-s{seed}.json"
    cached = json.loads(path.read_text()) if path.exists() else None
    names = configs(args)
    have = set(cached["summary"]["overall"]) if cached else set()
    todo = [n for n in names if f"{n}/probe" not in have]
    if not todo:
        return cached
    if not all(finished(run_dir(args.out, n, seed), args.steps) for n in todo):
        return None
    from bestrq2.encoder import BestRQ2Encoder

    encoders = {n: BestRQ2Encoder.from_pretrained(run_dir(args.out, n, seed) / "encoder") for n in todo}
    if cached is None:
        encoders.update(floors(encoders[todo[0]].config, seed))
    results, summary = score_builtin(encoders, seed=seed, probe=args.probe, epochs=args.epochs, cache=args.cache,
                                     names=args.tasks, limit=args.limit)
    res = {"tasks": [r.__dict__ for r in results], "summary": summary}
    if cached is not None:
        res = merge_scores(cached, res)
    path.write_text(json.dumps(res, indent=1))
    return res


def merge_scores(old: dict, new: dict) -> dict:
    """``old`` with ``new``'s encoders added: the same tasks in the same order, every per-encoder field
    (scores, intervals, hits, probe strengths) and summary scope updated."""
    if [t["task"] for t in old["tasks"]] != [t["task"] for t in new["tasks"]]:
        raise ValueError("cannot merge scores of different task lists")
    for t_old, t_new in zip(old["tasks"], new["tasks"]):
        if t_old["n_test"] != t_new["n_test"]:
            raise ValueError(f"{t_old['task']}: {t_old['n_test']} test clips cached, {t_new['n_test']} now")
        for k, v in t_new.items():
            if isinstance(v, dict):
                t_old.setdefault(k, {}).update(v)
    for scope, vals in new["summary"].items():
        old["summary"].setdefault(scope, {}).update(vals)
    return old


def code_usage(args) -> dict:
    """Code usage of each normalisation's targets on the corpus (seed-0 quantizer, 256 clips), cached in
    OUT/codes.json; a norm the cache lacks is measured and added."""
    path = args.out / "codes.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    todo = [n for n in args.norms if n not in out]
    if todo:
        from bestrq2.codes import run

        for norm in todo:
            # "bin" needs the statistics a run estimated: take them from that run's checkpoint
            d = run_dir(args.out, f"two_step-{norm}", 0)
            res = run([str(args.corpus)], run_dir=str(d) if norm == "bin" else None, seed=0, rpq_norm=norm)
            out[norm] = {k: res["overall"][k] for k in ("codes_used", "perplexity", "top_share", "entropy_nats")}
        path.write_text(json.dumps(out, indent=1))
    return {n: out[n] for n in args.norms}


def seed_diffs(rows: dict, a: str, b: str, score: str) -> list[float]:
    """Overall accuracy of ``a`` minus ``b`` in each seed, in seed order (fractions)."""
    return [x - y for x, y in zip(rows["overall"][f"{a}/{score}"], rows["overall"][f"{b}/{score}"])]


def write_results(args, per_seed: dict[int, dict], codes: dict) -> None:
    rows = aggregate(per_seed)
    seeds = sorted(per_seed)
    names = configs(args) + ["random_init", "logmel_stats"]

    def cell(scope: str, enc: str, score: str) -> str:
        vals = rows.get(scope, {}).get(f"{enc}/{score}")
        if not vals:
            return "–"
        m, s = mean_std([100 * v for v in vals])
        return f"{m:.1f} ± {s:.1f}" if len(vals) > 1 else f"{m:.1f}"

    def diff(a: str, b: str) -> dict:
        return pooled_paired(per_seed, a, b)

    lines = ["# The claim retested: two-step vs one-stage x quantizer input normalisation", "",
             f"Command: `python experiments/retest.py --corpus {args.corpus} --steps {args.steps} --seeds "
             f"{','.join(map(str, args.seeds))} --norms {','.join(args.norms)}` (preset {args.preset}, batch "
             f"{args.batch_size}, the {args.probe} probe). Seeds scored: {seeds}"
             + ("" if len(seeds) == len(args.seeds) else f" of {args.seeds}: **partial**, the other seeds are "
                "still training") + ". Test accuracy in %, mean ± std over seeds; differences pooled over seeds, "
             "95% paired bootstrap intervals over test clips, then each seed's own difference (the intervals "
             "cannot tell a seed's luck from a method's effect; the seeds can).", "",
             "| overall | probe | kNN |", "|---|---|---|"]
    lines += [f"| {n} | {cell('overall', n, 'probe')} | {cell('overall', n, 'knn')} |" for n in names]
    lines += ["", "| paired difference (overall) | probe | kNN | per seed: probe | per seed: kNN |",
              "|---|---|---|---|---|"]
    pairs = [(f"two_step-{n}", f"one_stage-{n}") for n in args.norms]
    pairs += [(f"{m}-{n}", f"{m}-none") for m in MODES for n in args.norms if n != "none"]
    summary = {}
    for a, b in pairs:
        d = diff(a, b).get("overall", {})
        fmt = lambda v: f"{100 * v[0]:+.1f} [{100 * v[1]:+.1f}, {100 * v[2]:+.1f}]" if v else "–"  # noqa: E731
        # the bootstrap resamples clips; the seeds' own differences show whether a lead is one seed's luck
        per = {k: seed_diffs(rows, a, b, k) for k in ("probe", "knn")}
        summary[f"{a} - {b}"] = {**d, "per_seed": per}
        lines.append(f"| {a} − {b} | {fmt(d.get('probe'))} | {fmt(d.get('knn'))} | "
                     + " | ".join(", ".join(f"{100 * v:+.1f}" for v in per[k]) for k in ("probe", "knn")) + " |")
    tasks = [t["task"] for t in next(iter(per_seed.values()))["tasks"]]
    for score in ("probe", "knn"):
        lines += ["", f"Per task, {score} (mean ± std over seeds):", "",
                  "| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {t} | " + " | ".join(cell(t, n, score) for n in names) + " |" for t in tasks]
    lines += ["", "Pretext at the end of pretraining (last 10% of steps, mean over seeds): masked-code loss and "
              "accuracy, and the batch's code perplexity and distinct codes (target health):", "",
              "| run | loss | accuracy | code perplexity | codes used |", "|---|---|---|---|---|"]
    for n in configs(args):
        stats = [pretrain_stats(run_dir(args.out, n, s), PRETEXT) for s in seeds]
        avg = {k: sum(x[k] for x in stats) / len(stats) for k in stats[0]}
        lines.append(f"| {n} | {avg['loss']:.2f} | {100 * avg['accuracy']:.1f}% | {avg['code_perplexity']:.1f} | "
                     f"{avg['codes_used']:.0f} |")
    lines += ["", "Code usage of the targets on the corpus (seed-0 quantizer):", "",
              "| rpq_norm | codes used | perplexity | top code | entropy (nats) |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {c['codes_used']} | {c['perplexity']:.1f} | {100 * c['top_share']:.1f}% | "
              f"{c['entropy_nats']:.2f} |" for n, c in codes.items()]
    lines += ["", "![retest](retest.png)"]
    args.results.mkdir(parents=True, exist_ok=True)
    plot(args, rows, names)
    (args.results / "retest.md").write_text("\n".join(lines) + "\n")
    (args.results / "retest.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "per_seed": per_seed, "paired": summary,
         "codes": codes}, indent=1))
    print("\n".join(lines))


def plot(args, rows: dict, names: list[str]) -> None:
    """Overall probe and kNN accuracy per configuration, mean and std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, score in zip(axes, ("probe", "knn")):
        stats = [mean_std([100 * v for v in rows.get("overall", {}).get(f"{n}/{score}", [0.0])]) for n in names]
        ax.bar(range(len(names)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3,
               color=["tab:blue" if n.startswith("two_step") else "tab:orange" if n.startswith("one_stage")
                      else "tab:gray" for n in names])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"overall {score}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    save_figure(fig, args.results / "retest.png",
                f"{args.preset} preset, {args.steps} steps on the Debian corpus, mean ± std over seeds")


def main(argv=None) -> int:
    ap = experiment_args(__doc__)
    ap.add_argument("--corpus", type=Path, required=True, help="a corpus made by bestrq2 prepare --debian")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--norms", default="none,patch", type=lambda s: s.split(","), help="rpq_norm values")
    ap.add_argument("--out", type=Path, default=Path("runs/retest"))
    ap.add_argument("--results", type=Path, default=Path("experiments/results"))
    ap.add_argument("--train-only", action="store_true", help="pretrain, score nothing")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: score and report the seeds whose runs are all finished (while others train)")
    args = ap.parse_args(argv)
    if not (args.corpus / "index.json").exists():
        ap.error(f"--corpus {args.corpus}: no prepared corpus there (bestrq2 prepare --debian default {args.corpus})")
    for seed in [] if args.report_only else args.seeds:  # seed by seed: a partial run still has whole seeds
        for name in configs(args):
            run_pretrain(run_dir(args.out, name, seed), flags(args, name), args.preset, args.steps, args.batch_size, seed)
    if args.train_only:
        return 0
    per_seed = {s: r for s in args.seeds if (r := evaluate(args, s)) is not None}
    if not per_seed:
        print("no seed has all its runs finished: nothing to score yet")
        return 1
    write_results(args, per_seed, code_usage(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
