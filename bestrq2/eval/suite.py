"""Run tasks against an encoder: clip features, probe and kNN scores, two floors, suite averages.

Clip feature = the encoder's frames mean-pooled over time. Floors on every task: log-mel mean + std
over time (256 values) with the same probe, and a randomly initialised encoder of the same
architecture. Suite score = mean of task test accuracies weighted by test-set size; also per domain.
Any encoder with the X-ARES attributes (``sampling_rate``, callable on [B, T] waveforms) works.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..data.folder import load_audio
from ..frontend import LogMel
from .probe import knn_classify, linear_probe
from .tasks import ManifestTask

log = logging.getLogger(__name__)


def clip_features(encoder, paths: list[str], max_seconds: float = 30.0) -> tuple[torch.Tensor, list[int]]:
    """[n_ok, D] mean-pooled frames, and the indices of the files that could be read."""
    feats, ok = [], []
    for i, p in enumerate(paths):
        try:
            wave = torch.from_numpy(load_audio(p))[: int(max_seconds * 16000)]
            if wave.shape[0] < 9375:  # shorter than one patch: pad with silence to one patch
                wave = torch.nn.functional.pad(wave, (0, 9375 - wave.shape[0]))
            with torch.no_grad():
                feats.append(encoder(wave[None]).float().mean(dim=1)[0])
            ok.append(i)
        except ValueError as err:
            log.warning("skipping %s: %s", p, err)
    return (torch.stack(feats) if feats else torch.empty(0, 0)), ok


class LogMelStats(torch.nn.Module):
    """The log-mel floor: per-bin mean and std over time, [B, 256] as a [B, 1, 256] 'frame'."""

    sampling_rate = 16000

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


def evaluate_task(task: ManifestTask, encoders: dict[str, object], epochs: int = 100, seed: int = 0) -> TaskScore:
    classes = task.classes
    cls = {c: i for i, c in enumerate(classes)}
    res = TaskScore(task.name, task.domain, 0)
    for name, enc in encoders.items():
        splits = {}
        for s in ("train", "val", "test"):
            items = task.split(s)
            x, ok = clip_features(enc, [it["path"] for it in items])
            res.skipped += len(items) - len(ok) if name == next(iter(encoders)) else 0
            y = torch.tensor([cls[items[i]["label"]] for i in ok], dtype=torch.long)
            splits[s] = (x, y)
        if any(splits[s][0].shape[0] == 0 for s in splits):
            raise ValueError(f"task {task.name}: a split has no readable audio")
        res.n_test = splits["test"][0].shape[0]
        probe = linear_probe(splits["train"], splits["val"], splits["test"], len(classes), epochs=epochs, seed=seed)
        res.scores[f"{name}/probe"] = probe.test_accuracy
        res.scores[f"{name}/knn"] = knn_classify(splits["train"], splits["test"], len(classes)).test_accuracy
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


def markdown(results: list[TaskScore]) -> str:
    keys = sorted({k for r in results for k in r.scores})
    lines = ["| task | domain | n test | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    for r in results:
        lines.append(f"| {r.task} | {r.domain} | {r.n_test} | " + " | ".join(f"{100 * r.scores[k]:.1f}" for k in keys) + " |")
    for scope, vals in summarize(results).items():
        lines.append(f"| **{scope}** | | | " + " | ".join(f"**{100 * vals[k]:.1f}**" for k in keys) + " |")
    return "\n".join(lines)
