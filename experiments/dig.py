"""Why two-step and one-stage tie at CPU scale (issue 8, part 3): the code prior, and what more steps,
the masking ratio and the predictor depth change. One seed (0): a difference below the
claim's seed-to-seed spread (about 1-2 points overall) is noise.

    python experiments/dig.py                                  # runs/dig, experiments/results/dig.{md,json,png}
    python experiments/dig.py --only two_step,one_stage --scale 0.004 --heldout 4 --prior-clips 32 --code-clips 3 \
        --tasks ufoai_sfx --limit 4 --epochs 2 --claim-out /none --claim-results /none --out /tmp/dig --results /tmp/dig
                                                        # a smoke run (steps scaled down)

Three measurements per variant:
1. pretext on held-out clips: masked-code cross-entropy and accuracy on 64 procedural clips the runs never
   saw (corpus seed 12345), a fixed mask of ratio 0.5 for every variant, against count models fitted on
   512 training clips: the code frequencies (unigram), the code frequencies of the patch's frequency row
   (a model that only learned "which codes live in which band" reaches this), and the row's codes given
   the code of the nearest visible patch in the row (neighbour);
2. downstream: linear probe and kNN on the built-in tasks (as experiments/claim.py);
3. the code distribution itself on the procedural corpus and on the eval tasks' real audio, with the raw
   patches (the paper) and with each patch's mean removed (how much the loudness level alone decides
   the code).
Variants at the claim's 500 steps and default config reuse the claim's seed-0 runs (runs/claim) and
scores (experiments/results/claim.json) when present.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bestrq2.codes import usage
from bestrq2.eval.code_prior import context_free_and_neighbour
from bestrq2.eval.experiment import builtin_tasks, experiment_args, finished, floors, run_dir, run_pretrain, score_builtin

CLAIM_MODES = ("two_step", "one_stage")  # experiments/claim.py's runs, reused at its steps and seed 0

SEED = 0
HELDOUT_SEED = 12345
PRIOR_CLIPS = 512
# name: (flags of `bestrq2 pretrain`, steps). Listed in the order they run (most informative first).
VARIANTS: dict[str, tuple[list[str], int]] = {
    "two_step": ([], 500),
    "one_stage": (["--one-stage"], 500),
    "two_step_2000steps": ([], 2000),
    "one_stage_2000steps": (["--one-stage"], 2000),
    "two_step_mask0.2-0.3": (["--mask-ratio", "0.2", "0.3"], 500),
    "two_step_mask0.7-0.8": (["--mask-ratio", "0.7", "0.8"], 500),
    "two_step_pred1": (["--predictor-depth", "1"], 500),
    "two_step_pred4": (["--predictor-depth", "4"], 500),
}


def steps_of(args, name: str) -> int:
    return max(2, round(VARIANTS[name][1] * args.scale))


def run_path(args, name: str) -> Path:
    """The claim's own run for the two baselines (same flags, steps, batch and seed), else OUT/<name>."""
    if name in CLAIM_MODES and args.claim_out is not None:
        d = run_dir(args.claim_out, name, SEED)
        if d.exists() and finished(d, steps_of(args, name)):
            return d
    return args.out / f"{name}-s{SEED}"


def train(args, name: str) -> None:
    """Pretrain one variant (resuming an interrupted run; a finished one is kept)."""
    run_pretrain(run_path(args, name), VARIANTS[name][0], args.preset, steps_of(args, name),
                              args.batch_size, SEED)


# ------------------------------------------------------------------------------ the code prior
def procedural_waves(seed: int, count: int, start: int = 0):
    import numpy as np
    import torch

    from bestrq2.data.synthetic import synth_clip

    return torch.from_numpy(np.stack([synth_clip(seed, start + i) for i in range(count)]))


def pretext(args) -> dict:
    """Held-out masked-code loss/accuracy of every variant vs the context-free priors (cached)."""
    path = args.out / "pretext.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    import torch

    from bestrq2 import BestRQ2, BestRQ2Config
    from bestrq2.masking import sample_mask
    from bestrq2.checkpoints import latest_checkpoint

    cfg0 = BestRQ2Config.preset(args.preset, seed=SEED)
    ref = BestRQ2(cfg0).eval()  # only its frozen quantizer (seed 0, as every variant's) is used here
    rows = cfg0.freq_patches
    k = cfg0.codebook_size
    waves = procedural_waves(HELDOUT_SEED, args.heldout)
    with torch.no_grad():
        codes = ref.targets(waves)[..., 0]  # [B, N]
    n = codes.shape[1]
    mask = sample_mask(1, n, (0.5, 0.5), generator=torch.Generator().manual_seed(0))[0]
    if "heldout" not in cached:
        with torch.no_grad():
            train_codes = torch.cat([ref.targets(procedural_waves(SEED, 32, i))[..., 0]
                                     for i in range(0, args.prior_clips, 32)])
        cached["prior"] = {"train_codes": usage(train_codes, k)}
        cached["heldout"] = {**context_free_and_neighbour(train_codes, codes, mask, rows, k),
                             "codes": usage(codes[:, mask], k), "clips": args.heldout, "mask_ratio": 0.5}
    for name in args.variants:
        d = run_path(args, name)
        if name in cached.get("variants", {}) or not finished(d, steps_of(args, name)):
            continue
        state = torch.load(latest_checkpoint(d), map_location="cpu", weights_only=True)
        model = BestRQ2(BestRQ2Config.from_dict(state["model_config"]))
        model.load_state_dict(state["model"])
        model.eval()
        losses, accs = [], []
        with torch.no_grad():
            for i in range(0, args.heldout, 16):
                w = waves[i:i + 16]
                out = model(w, mask=mask[None, :].expand(w.shape[0], -1))
                losses.append(float(out.loss) * w.shape[0])
                accs.append(float(out.accuracy) * w.shape[0])
        cached.setdefault("variants", {})[name] = {"loss": sum(losses) / args.heldout,
                                                   "accuracy": sum(accs) / args.heldout, "run": str(d)}
        print(f"[{time.strftime('%H:%M:%S')}] pretext {name}: {cached['variants'][name]}", flush=True)
    path.write_text(json.dumps(cached))
    return cached


def real_audio_codes(args, limit: int) -> dict:
    """Code statistics of the eval tasks' train-split audio (raw patches, and patch means removed)."""
    import torch

    from bestrq2 import BestRQ2Config
    from bestrq2.data.folder import load_audio
    from bestrq2.frontend import LogMel, patchify, truncate_to_patches
    from bestrq2.quantizer import RandomProjectionQuantizer

    cfg = BestRQ2Config.preset(args.preset, seed=SEED)
    k = cfg.codebook_size
    q = RandomProjectionQuantizer(cfg.patch_dim, cfg.codebook_dim, cfg.codebook_size, cfg.num_codebooks, SEED)
    mel = LogMel()

    def patches_of(waves):
        return patchify(truncate_to_patches(mel(waves))).reshape(-1, cfg.patch_dim)

    out = {}
    sources = {"procedural": [w for w in procedural_waves(SEED, 64)]}
    for task in builtin_tasks(args.cache, args.tasks, 0, args.limit):
        sources[task.name] = [torch.from_numpy(load_audio(it["path"])) for it in task.split("train")[:limit]]
    for name, waves in sources.items():
        patches = torch.cat([patches_of(w[None]) for w in waves if w.numel() >= cfg.min_samples + 1])
        out[name] = {"raw": usage(q(patches)[:, 0], k),
                     "mean_removed": usage(q(patches - patches.mean(1, keepdim=True))[:, 0], k),
                     "mean_db": float(patches.mean()), "std_db_within_patch": float(patches.std(1).mean())}
    return out


# ------------------------------------------------------------------------------ downstream
def of(encoder: str, scores: dict) -> dict:
    """{"<encoder>/<probe|knn>": acc} -> {"probe": acc, "knn": acc} for one encoder."""
    return {k.split("/")[1]: v for k, v in scores.items() if k.startswith(encoder + "/")}


def downstream(args, names: list[str]) -> dict:
    """Probe/kNN scores per variant (seed 0), cached per variant in OUT/eval.json."""
    path = args.out / "eval.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    if args.claim_results is not None and (args.claim_results / "claim.json").exists() and args.scale == 1:
        base = json.loads((args.claim_results / "claim.json").read_text())["per_seed"].get(str(SEED))
        for enc in ("two_step", "one_stage", "random_init", "logmel_stats"):
            if base and enc not in cached:
                cached[enc] = {"summary": {sc: of(enc, vals) for sc, vals in base["summary"].items()},
                               "from": "claim.json"}
    todo = [n for n in names if n not in cached and finished(run_path(args, n), steps_of(args, n))]
    missing = [f for f in ("random_init", "logmel_stats") if f not in cached]
    if not todo and not missing:
        return cached
    from bestrq2.encoder import BestRQ2Encoder

    encoders = {n: BestRQ2Encoder.from_pretrained(run_path(args, n) / "encoder") for n in todo}
    if missing:
        config = BestRQ2Encoder.from_pretrained(run_path(args, names[0]) / "encoder").config
        encoders.update({f: e for f, e in floors(config, SEED).items() if f in missing})
    results, summary = score_builtin(encoders, seed=SEED, probe=args.probe, epochs=args.epochs, cache=args.cache,
                                     names=args.tasks, limit=args.limit)
    for enc in encoders:
        cached[enc] = {"summary": {sc: of(enc, vals) for sc, vals in summary.items()},
                       "tasks": {r.task: of(enc, r.scores) for r in results}}
    path.write_text(json.dumps(cached, indent=1))
    return cached


# ------------------------------------------------------------------------------ report
def write_report(args, pre: dict, down: dict, codes: dict) -> None:
    h = pre["heldout"]
    minutes = {n: m for n in args.variants if (m := step_minutes(run_path(args, n), args.batch_size))}
    lines = ["# Digging into the tie: code prior, steps, masking ratio, predictor depth", "",
             f"Command: `python experiments/dig.py` (seed {SEED}, {args.preset} preset, batch {args.batch_size}, "
             "procedural corpus; one seed, so differences under ~2 points overall are within the claim's "
             "seed-to-seed spread). Summed step times per variant on this machine (2-core CPU; some runs "
             "shared the cores with other jobs for a while, so these compare only roughly): "
             + ", ".join(f"{n} {m:.0f} min" for n, m in minutes.items()) + ".",
             "",
             "## 1. Pretext: masked-code prediction on held-out clips", "",
             f"{h['clips']} procedural clips no run saw, the same fixed mask (ratio {h['mask_ratio']}) for every "
             f"variant; {h['codes']['codes_used']} distinct codes among the {h['codes']['patches']} masked "
             f"patches, the top one {100 * h['codes']['top_share']:.1f}%. Context-free predictors fitted on "
             f"{args.prior_clips} training clips: *unigram* (always the code frequencies) and *row unigram* (the "
             "code frequencies of the patch's frequency band); and a *neighbour* count model that sees one "
             "visible patch's code (the nearest in the same band; its smoothing weight β, the best of 1, 5, 20, 100 "
             "here), a floor for what the context tells. A "
             "model has used the context only where it beats the row unigram.", "",
             "| predictor | steps | held-out loss (nats) | accuracy | loss − row unigram |", "|---|---|---|---|---|",
             f"| unigram | – | {h['unigram']['loss']:.3f} | {100 * h['unigram']['accuracy']:.1f}% | "
             f"{h['unigram']['loss'] - h['row_unigram']['loss']:+.3f} |",
             f"| row unigram | – | {h['row_unigram']['loss']:.3f} | {100 * h['row_unigram']['accuracy']:.1f}% | 0 |",
             f"| neighbour (count model, β = {h['neighbour']['beta']:g}) | – | {h['neighbour']['loss']:.3f} | {100 * h['neighbour']['accuracy']:.1f}% | "
             f"{h['neighbour']['loss'] - h['row_unigram']['loss']:+.3f} |"]
    for name in args.variants:
        v = pre.get("variants", {}).get(name)
        if v:
            lines.append(f"| {name} | {steps_of(args, name)} | {v['loss']:.3f} | {100 * v['accuracy']:.1f}% | "
                         f"{v['loss'] - h['row_unigram']['loss']:+.3f} |")
    lines += ["", "## 2. Downstream (test accuracy %, built-in tasks, seed 0)", "",
              "| encoder | probe overall | kNN overall | probe speech | probe music | probe environment |",
              "|---|---|---|---|---|---|"]
    for name in [*args.variants, "random_init", "logmel_stats"]:
        if name in down:
            s = down[name]["summary"]
            cell = lambda sc, p: f"{100 * s[sc][p]:.1f}" if sc in s and p in s[sc] else "–"  # noqa: E731
            lines.append(f"| {name} | {cell('overall', 'probe')} | {cell('overall', 'knn')} | {cell('speech', 'probe')} "
                         f"| {cell('music', 'probe')} | {cell('environment', 'probe')} |")
    lines += ["", "## 3. Where the codes come from", "",
              "RPQ codes (seed-0 quantizer) over the patches of 64 procedural clips and of each task's train "
              "split: raw patches as the paper quantizes them, and the same patches with each patch's own mean "
              "(its loudness level) removed.", "",
              "| audio | patches | mean dB | within-patch std dB | codes used (raw) | top code (raw) | entropy (raw, nats) "
              "| codes used (mean removed) | top code (mean removed) | entropy (mean removed) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in codes.items():
        r, m = c["raw"], c["mean_removed"]
        lines.append(f"| {name} | {r['patches']} | {c['mean_db']:.1f} | {c['std_db_within_patch']:.1f} | "
                     f"{r['codes_used']} | {100 * r['top_share']:.1f}% | {r['entropy_nats']:.2f} | {m['codes_used']} | "
                     f"{100 * m['top_share']:.1f}% | {m['entropy_nats']:.2f} |")
    lines += ["", "![dig](dig.png)", ""]
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "dig.md").write_text("\n".join(lines))
    (args.results / "dig.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "step_minutes": minutes,
         "pretext": pre, "downstream": down, "codes": codes},
        indent=1))
    plot(args, pre)
    print("\n".join(lines))


def step_minutes(d: Path, batch: int) -> float:
    """Minutes of a run's optimizer steps, from metrics.csv (step time = batch / clips_per_s)."""
    import csv

    f = d / "metrics.csv"
    if not f.exists():
        return 0.0
    rows = [r for r in csv.DictReader(open(f)) if float(r["clips_per_s"]) > 0]
    return sum(batch / float(r["clips_per_s"]) for r in rows) / 60 if rows else 0.0


def plot(args, pre: dict) -> None:
    """Training loss curves of every variant against the held-out row-unigram loss."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name in args.variants:
        f = run_path(args, name) / "metrics.csv"
        if not f.exists():
            continue
        rows = list(csv.DictReader(open(f)))
        xs, ys = [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]
        k = max(1, len(ys) // 40)  # a running mean: single steps of 16 clips are noisy
        sm = [sum(ys[max(0, i - k):i + 1]) / len(ys[max(0, i - k):i + 1]) for i in range(len(ys))]
        ax.plot(xs, sm, label=name, lw=1.2, ls="--" if "one_stage" in name else "-")
    h = pre["heldout"]
    for key, ls in (("row_unigram", ":"), ("unigram", "-."), ("neighbour", "--")):
        ax.axhline(h[key]["loss"], color="k", ls=ls, lw=1, label=f"{key.replace('_', ' ')} prior (held-out)")
    ax.set_ylim(bottom=min(2.0, h["row_unigram"]["loss"] - 0.5), top=6)
    ax.set_xlabel("step (batch 16)")
    ax.set_ylabel("training masked-code loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("pretext loss against the context-free code priors")
    fig.tight_layout()
    fig.savefig(args.results / "dig.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = experiment_args(__doc__)
    ap.add_argument("--only", default=None, help="comma list of variants (default: all, in order)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every variant's steps (smoke runs)")
    ap.add_argument("--heldout", type=int, default=64, help="held-out clips for the pretext measurement")
    ap.add_argument("--prior-clips", type=int, default=PRIOR_CLIPS, help="training clips the priors are fitted on")
    ap.add_argument("--code-clips", type=int, default=200, help="train clips per task for the code statistics")
    ap.add_argument("--out", type=Path, default=Path("runs/dig"))
    ap.add_argument("--claim-out", type=Path, default=Path("runs/claim"), help="the claim's runs, reused")
    ap.add_argument("--claim-results", type=Path, default=Path("experiments/results"), help="the claim's claim.json, reused")
    ap.add_argument("--results", type=Path, default=Path("experiments/results"))
    ap.add_argument("--no-train", action="store_true", help="report on the runs that exist, train nothing")
    ap.add_argument("--train-only", action="store_true", help="train the variants, measure and report nothing")
    args = ap.parse_args(argv)
    args.variants = list(VARIANTS) if args.only is None else args.only.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_train:
        for name in args.variants:
            train(args, name)
    if args.train_only:
        return 0
    pre = pretext(args)
    down = downstream(args, args.variants)
    codes_path = args.out / "codes.json"
    if not codes_path.exists():
        codes_path.write_text(json.dumps(real_audio_codes(args, args.code_clips), indent=1))
    write_report(args, pre, down, json.loads(codes_path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
