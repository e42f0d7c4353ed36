"""Run tasks against encoders: clip features, probe and kNN scores with 95% intervals, two floors,
suite averages and paired comparisons.

Clip feature = the encoder's frames mean-pooled over time. A clip shorter than 1 s is zero-padded to
1 s, as X-ARES does (counted per task); an unreadable or missing file is skipped (counted and named).
Floors on every task: log-mel mean + std over time (256 values) with the same probes, and a randomly
initialised encoder of the same architecture. Suite score = mean of task accuracies weighted by test
size, overall and per domain. Intervals: ``stats`` (bootstrap over test clips). Any encoder with the
X-ARES attributes (``sampling_rate``, callable on [B, T] waveforms) works.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..config import SAMPLE_RATE
from ..frontend import LogMel
from .probe import knn_classify, logistic_probe, xares_probe
from .stats import accuracy_ci, mean_std, paired_difference
from .tasks import ManifestTask, cv_folds

log = logging.getLogger(__name__)
SHORTEST = SAMPLE_RATE  # X-ARES pads clips under 1 s to 1 s
PROBES = ("logistic", "xares")


@dataclass
class ClipFeatures:
    x: torch.Tensor  # [n_ok, D]
    ok: list[int]  # indices of the paths that were read
    padded: int = 0  # clips under 1 s, zero-padded to 1 s
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why


def clip_features(encoder, paths: list[str], max_seconds: float = 30.0, progress: bool = False,
                  desc: str = "features", batch_size: int = 8) -> ClipFeatures:
    """Mean-pooled frames of every readable file (a progress bar over clips with ``progress``), run
    ``batch_size`` clips at a time (``bestrq2.embedding.embed_files``: equal to one at a time up to float32
    rounding)."""
    from ..embedding import embed_files

    feats: dict[int, torch.Tensor] = {}
    padded, skipped = 0, {}
    for res in embed_files(encoder, paths, batch_size=batch_size, max_seconds=max_seconds,
                           min_seconds=SHORTEST / SAMPLE_RATE, pool="mean", progress=progress, desc=desc):
        if res.error is not None:
            skipped[res.path] = res.error
            if res.error != "file not found":
                log.warning("skipping %s: %s", res.path, res.error)
            continue
        feats[res.index] = res.frames
        padded += res.padded
    ok = sorted(feats)
    return ClipFeatures(torch.stack([feats[i] for i in ok]) if ok else torch.empty(0, 0), ok, padded, skipped)


class LogMelStats(torch.nn.Module):
    """The log-mel floor: per-bin mean and std over time, [B, 256] as a [B, 1, 256] 'frame'."""

    sampling_rate = SAMPLE_RATE

    def __init__(self) -> None:
        super().__init__()
        self.mel = LogMel()

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = self.mel(wave)  # [B, 128, T']
        return torch.cat([spec.mean(-1), spec.std(-1)], dim=-1)[:, None, :]


@dataclass
class TaskScore:
    task: str
    domain: str
    n_test: int
    scores: dict[str, float] = field(default_factory=dict)  # "<encoder>/<probe|knn>" -> test accuracy
    skipped: int = 0
    ci: dict[str, list[float]] = field(default_factory=dict)  # key -> [low, high], 95% bootstrap
    hits: dict[str, list[float]] = field(default_factory=dict)  # key -> per test clip (mean over seeds)
    seed_std: dict[str, float] = field(default_factory=dict)  # xares probe: std of the score over seeds
    padded: int = 0
    skipped_files: dict[str, str] = field(default_factory=dict)
    probe: str = "logistic"
    folds: int = 1
    l2: dict[str, list[float]] = field(default_factory=dict)  # logistic: the strength chosen per fold


def _splits(task: ManifestTask, ok: list[int], cv) -> list[tuple[list[int], list[int], list[int]]]:
    """(train, val, test) positions into ``ok``: the manifest's split, or cross-validation folds."""
    items = [task.items[i] for i in ok]
    if cv:
        return cv_folds(items, cv)
    by = {s: [j for j, it in enumerate(items) if it["split"] == s] for s in ("train", "val", "test")}
    return [(by["train"], by["val"], by["test"])]


def evaluate_task(task: ManifestTask, encoders: dict[str, object], epochs: int = 1000, seed: int = 0,
                  probe: str = "logistic", cv: int | str | None = None, seeds: tuple[int, ...] | None = None,
                  progress: bool = False, batch_size: int = 8) -> TaskScore:
    """Scores of every encoder on one task. ``probe``: "logistic" (deterministic) or "xares" (run for
    each of ``seeds``, default (seed,); the score is the mean, ``seed_std`` the spread); kNN always.
    ``cv``: K (folds over groups) or "groups" (leave one group out) instead of the manifest's split.
    ``batch_size``: clips an encoder runs at a time for the features (``clip_features``)."""
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    classes = task.classes
    cls = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([cls[it["label"]] for it in task.items], dtype=torch.long)
    paths = [it["path"] for it in task.items]
    feats = {name: clip_features(enc, paths, progress=progress, desc=f"{task.name}: {name}", batch_size=batch_size)
             for name, enc in encoders.items()}
    first = next(iter(feats.values()))
    ok = sorted(set.intersection(*(set(f.ok) for f in feats.values())))
    res = TaskScore(task.name, task.domain, 0, skipped=len(paths) - len(ok), padded=first.padded,
                    skipped_files=dict(first.skipped), probe=probe)
    folds = _splits(task, ok, cv)
    res.folds = len(folds)
    if any(not tr or not va or not te for tr, va, te in folds):
        raise ValueError(f"task {task.name}: a split has no readable audio")
    test_order = sorted(j for _, _, te in folds for j in te)
    res.n_test = len(test_order)
    seeds = tuple(seeds or (seed,))
    for name, f in feats.items():
        rows = {i: r for r, i in enumerate(f.ok)}
        x = f.x[[rows[i] for i in ok]]
        y = labels[ok]
        runs = len(seeds) if probe == "xares" else 1  # logistic is deterministic: one run
        hits = {"probe": torch.zeros(runs, len(ok)), "knn": torch.zeros(1, len(ok))}
        for tr, va, te in folds:
            part = [(x[idx], y[idx]) for idx in (tr, va, te)]
            if probe == "logistic":
                r = logistic_probe(*part, len(classes))
                res.l2.setdefault(name, []).append(r.l2)
                hits["probe"][0, te] = (r.predictions == y[te]).float()
            else:
                for s_i, s in enumerate(seeds):
                    r = xares_probe(*part, len(classes), epochs=epochs, seed=s)
                    hits["probe"][s_i, te] = (r.predictions == y[te]).float()
            hits["knn"][0, te] = (knn_classify(part[0], part[2], len(classes)).predictions == y[te]).float()
        for kind, h in hits.items():
            key = f"{name}/{kind}"
            per_seed = h[:, test_order]
            mean_hits = per_seed.mean(0)
            acc, lo, hi = accuracy_ci([mean_hits], seed=seed)
            res.scores[key], res.ci[key], res.hits[key] = acc, [lo, hi], mean_hits.tolist()
            if per_seed.shape[0] > 1:
                res.seed_std[key] = mean_std(per_seed.mean(1).tolist())[1]
    return res


def summarize(results: list[TaskScore]) -> dict[str, dict[str, float]]:
    """{"overall": {key: weighted mean}, "<domain>": {...}} over tasks, weighted by test-set size."""
    out: dict[str, dict[str, float]] = {}
    for scope in ["overall"] + sorted({r.domain for r in results}):
        rs = [r for r in results if scope == "overall" or r.domain == scope]
        n = sum(r.n_test for r in rs)
        keys = sorted({k for r in rs for k in r.scores})
        out[scope] = {k: sum(r.scores[k] * r.n_test for r in rs if k in r.scores) / n for k in keys}
    return out


def _scopes(results: list[TaskScore]) -> dict[str, list[TaskScore]]:
    return {"overall": results, **{d: [r for r in results if r.domain == d] for d in sorted({r.domain for r in results})}}


def summarize_ci(results: list[TaskScore], seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """{scope: {key: [accuracy, 95% low, 95% high]}}: test-size-weighted, clips resampled per task."""
    out = {}
    for scope, rs in _scopes(results).items():
        keys = sorted({k for r in rs for k in r.hits})
        out[scope] = {k: list(accuracy_ci([torch.tensor(r.hits[k]) for r in rs if k in r.hits], seed=seed))
                      for k in keys}
    return out


def paired(results: list[TaskScore], a: str, b: str, seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """Encoder ``a`` minus encoder ``b`` on the same test clips, per task, per domain and overall:
    {scope: {"probe"|"knn": [mean difference, 95% low, 95% high]}}."""
    out: dict[str, dict[str, list[float]]] = {}
    scopes = {r.task: [r] for r in results}
    scopes.update(_scopes(results))
    for scope, rs in scopes.items():
        out[scope] = {}
        for kind in ("probe", "knn"):
            ha = [torch.tensor(r.hits[f"{a}/{kind}"]) for r in rs]
            hb = [torch.tensor(r.hits[f"{b}/{kind}"]) for r in rs]
            out[scope][kind] = list(paired_difference(ha, hb, seed=seed))
    return out


def _cell(acc: float, ci: list[float] | None) -> str:
    return f"{100 * acc:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def markdown(results: list[TaskScore], compare: tuple[str, str] | None = None) -> str:
    """Test accuracy in % with its 95% interval per task and suite scope; with ``compare`` = (a, b) a
    table of paired differences a - b."""
    keys = sorted({k for r in results for k in r.scores})
    lines = ["| task | domain | n test | padded | skipped | " + " | ".join(keys) + " |",
             "|---|---|---|---|---|" + "---|" * len(keys)]
    for r in results:
        lines.append(f"| {r.task} | {r.domain} | {r.n_test} | {r.padded} | {r.skipped} | "
                     + " | ".join(_cell(r.scores[k], r.ci.get(k)) for k in keys) + " |")
    if all(r.hits for r in results):
        for scope, vals in summarize_ci(results).items():
            lines.append(f"| **{scope}** | | {sum(r.n_test for r in _scopes(results)[scope])} | | | "
                         + " | ".join(f"**{_cell(vals[k][0], vals[k][1:])}**" if k in vals else "" for k in keys) + " |")
    if compare and all(r.hits for r in results):
        a, b = compare
        lines += ["", f"Paired difference {a} − {b} (same test clips; 95% bootstrap interval):", "",
                  "| scope | probe | kNN |", "|---|---|---|"]
        for scope, d in paired(results, a, b).items():
            lines.append(f"| {scope} | " + " | ".join(f"{100 * d[k][0]:+.1f} [{100 * d[k][1]:+.1f}, {100 * d[k][2]:+.1f}]"
                                                       for k in ("probe", "knn")) + " |")
    return "\n".join(lines)
