"""What the experiment scripts (``experiments/``) and ``bestrq2 eval`` share: pretraining runs as
``bestrq2 pretrain`` subprocesses that resume where they stopped, the floors every comparison needs,
scoring encoders on a list of tasks, and the statistics over seeds.

    from bestrq2.eval.experiment import run_pretrain, floors, score_builtin
    run_pretrain(Path("runs/x-s0"), ["--one-stage"], "tiny", 500, 16, seed=0)
    results, summary = score_builtin({"x": BestRQ2Encoder.from_pretrained("runs/x-s0/encoder"), **floors(cfg, 0)})
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path


# ------------------------------------------------------------------------------ pretraining runs
def run_dir(out: Path, name: str, seed: int) -> Path:
    """OUT/<name>-s<seed>: one run of one variant and seed."""
    return out / f"{name}-s{seed}"


def finished(d: Path, steps: int) -> bool:
    """A run has a checkpoint at ``steps`` or later (its encoder/ is written at every checkpoint, so the
    encoder alone proves nothing)."""
    ckpts = sorted((d / "checkpoints").glob("ckpt-*.pt")) if d.exists() else []
    return bool(ckpts) and int(ckpts[-1].stem.split("-")[1]) >= steps


def run_pretrain(d: Path, flags: list[str], preset: str, steps: int, batch_size: int, seed: int) -> float:
    """``bestrq2 pretrain`` into run dir d (logged to d/train.log), resuming it if it has checkpoints and
    skipping it if it is finished; seconds spent in this call."""
    if finished(d, steps):
        return 0.0
    resume = d.exists() and any((d / "checkpoints").glob("ckpt-*.pt"))
    cmd = [sys.executable, "-m", "bestrq2.cli", "pretrain", "--preset", preset, *flags, "--steps", str(steps),
           "--batch-size", str(batch_size), "--seed", str(seed), "--ckpt-every", str(max(1, steps // 5)),
           "--no-progress"]
    cmd += ["--resume", str(d)] if resume else ["--out", str(d)]
    d.mkdir(parents=True, exist_ok=True)
    if not resume:  # a run stopped before its first checkpoint left nothing worth keeping
        (d / "metrics.csv").unlink(missing_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] pretrain {d.name}: {' '.join(cmd[3:])}", flush=True)
    t0 = time.time()
    with open(d / "train.log", "a") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.time() - t0


def pretrain_stats(d: Path, columns: tuple[str, ...] = ("loss", "accuracy", "clips_per_s")) -> dict[str, float]:
    """Means of metrics.csv ``columns`` (default: loss, masked-code accuracy, throughput) over the last 10%
    of a run's steps."""
    import csv

    rows = list(csv.DictReader(open(d / "metrics.csv")))
    tail = rows[-max(1, len(rows) // 10):]
    return {k: sum(float(r[k]) for r in tail) / len(tail) for k in columns}


# ------------------------------------------------------------------------------ scoring
def floors(config, seed: int, precision: str = "fp32") -> dict:
    """The two floors: a random-init encoder of ``config`` (weights from ``seed``, in ``precision``) and
    log-mel statistics."""
    import torch

    from ..encoder import BestRQ2Encoder
    from .suite import LogMelStats

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {"random_init": BestRQ2Encoder(config, precision=precision).eval(), "logmel_stats": LogMelStats()}


def builtin_tasks(cache: Path | None = None, names: list[str] | None = None, seed: int = 0,
                  limit: int | None = None) -> list:
    """The built-in tasks (``bestrq2.eval.debian``), built into ``cache`` if missing, as read manifests."""
    from .debian import DEFAULT_CACHE, prepare_tasks
    from .tasks import read_manifest

    made = prepare_tasks(cache or DEFAULT_CACHE, names=names, seed=seed, limit=limit)
    return [read_manifest(str(manifest), name=name, domain=domain, seed=seed) for name, (domain, manifest) in made.items()]


def evaluate_tasks(tasks: list, encoders: dict, *, probe: str = "logistic", epochs: int = 1000, seed: int = 0,
                   seeds: tuple[int, ...] | None = None, cv=None, progress: bool = False, batch_size: int = 8) -> list:
    """Every encoder on every task (``suite.evaluate_task``): TaskScore list. A task that cannot be scored
    (too few clips for its split) is skipped with a line saying why; padded and skipped clips are said."""
    from tqdm.auto import tqdm

    from .suite import evaluate_task

    results = []
    for task in tqdm(tasks, desc="tasks", unit="task", disable=not progress):
        if not progress:
            print(f"[{time.strftime('%H:%M:%S')}] eval seed {seed}: {task.name} ({', '.join(encoders)})", flush=True)
        try:
            res = evaluate_task(task, encoders, epochs=epochs, seed=seed, probe=probe, cv=cv,
                                seeds=seeds or (seed,), progress=progress, batch_size=batch_size)
        except ValueError as err:
            print(f"task {task.name}: skipped ({err})")
            continue
        if res.skipped or res.padded:
            example = (f" (e.g. {next(iter(res.skipped_files))}: {next(iter(res.skipped_files.values()))})"
                       if res.skipped_files else "")
            print(f"task {task.name}: {res.padded} clips under 1 s padded to 1 s, {res.skipped} files skipped{example}")
        results.append(res)
    return results


def score_builtin(encoders: dict, *, seed: int = 0, probe: str = "logistic", epochs: int = 1000,
                  cache: Path | None = None, names: list[str] | None = None, limit: int | None = None):
    """Probe + kNN of every encoder on the built-in tasks: (TaskScore list, summary per domain and overall)."""
    from .suite import summarize

    results = evaluate_tasks(builtin_tasks(cache, names, 0, limit), encoders, probe=probe, epochs=epochs, seed=seed)
    return results, summarize(results)


# ------------------------------------------------------------------------------ over seeds
def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def aggregate(per_seed: dict[int, dict]) -> dict:
    """{scope: {"<encoder>/<probe|knn>": [per-seed accuracies]}} with scope = task, domain or overall."""
    rows: dict[str, dict[str, list[float]]] = {}
    for res in per_seed.values():
        for t in res["tasks"]:
            for k, v in t["scores"].items():
                rows.setdefault(t["task"], {}).setdefault(k, []).append(v)
        for scope, vals in res["summary"].items():
            for k, v in vals.items():
                rows.setdefault(scope, {}).setdefault(k, []).append(v)
    return rows


def pooled_paired(per_seed: dict[int, dict], a: str, b: str) -> dict:
    """{scope: {"probe"|"knn": [diff, low, high]}}: each clip's hits averaged over seeds, then the paired
    bootstrap of ``suite.paired`` (empty when a seed's results predate per-clip hits)."""
    import torch

    from .suite import TaskScore, paired

    runs = list(per_seed.values())
    if not all(t.get("hits") for r in runs for t in r["tasks"]):
        return {}
    merged = []
    for i, t in enumerate(runs[0]["tasks"]):
        hits = {k: torch.tensor([r["tasks"][i]["hits"][k] for r in runs]).mean(0).tolist() for k in t["hits"]}
        merged.append(TaskScore(t["task"], t["domain"], t["n_test"], dict(t["scores"]), hits=hits))
    return paired(merged, a, b)


def save_figure(fig, path: Path, title: str) -> None:
    """Title, tight layout, PNG at 110 dpi, figure closed (the experiments' plots)."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def experiment_args(doc: str) -> argparse.ArgumentParser:
    """The options the experiment scripts share: model size, batch, and how the tasks are scored."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--probe", default="logistic", choices=["logistic", "xares"], help="see bestrq2 eval --probe")
    ap.add_argument("--epochs", type=int, default=1000, help="xares probe: most epochs (early stopping on val)")
    ap.add_argument("--tasks", default=None, type=lambda s: s.split(","), help="comma list of built-in tasks")
    ap.add_argument("--limit", type=int, default=None, help="files per class in the tasks (smoke runs)")
    ap.add_argument("--cache", type=Path, default=None, help="eval task cache (default ~/.cache/bestrq2/eval)")
    return ap
