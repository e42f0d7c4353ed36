"""Tasks: a labelled set of audio files with train/val/test splits that keep groups apart.

A manifest is a CSV with columns ``path,label`` and either ``split`` (train | val | test) or
``group`` (speaker, voice pack, soundfont, recording ...). With groups, splits are made by group so
that no group is in two splits. Paths are relative to the manifest's folder unless absolute.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")
COLUMNS = {"path", "label", "split", "group"}


@dataclass
class ManifestTask:
    name: str
    domain: str
    items: list[dict] = field(default_factory=list)  # {"path", "label", "split", "group"}

    @property
    def classes(self) -> list[str]:
        return sorted({it["label"] for it in self.items})

    def split(self, name: str) -> list[dict]:
        return [it for it in self.items if it["split"] == name]


def group_split(groups: list[str], fractions=(0.7, 0.1, 0.2), seed: int = 0) -> dict[str, str]:
    """Assign whole groups to train/val/test: groups in a seeded hash order fill train, then val, then
    test by item count; val and test each get at least one group. No group lands in two splits."""
    counts: dict[str, int] = {}
    for g in groups:
        counts[g] = counts.get(g, 0) + 1
    if len(counts) < 3:
        raise ValueError(f"group_split needs at least 3 groups to keep train, val and test apart, got {len(counts)}")
    order = sorted(counts, key=lambda g: hashlib.sha1(f"{seed}:{g}".encode()).hexdigest())
    total, seen, out = len(groups), 0, {}
    for g in order:
        frac = seen / total
        out[g] = "train" if frac < fractions[0] else ("val" if frac < fractions[0] + fractions[1] else "test")
        seen += counts[g]
    if "test" not in out.values():
        out[order[-1]] = "test"
    if "val" not in out.values():
        out[order[-2]] = "val"
    return out


def read_manifest(path: str | Path, name: str | None = None, domain: str = "custom", seed: int = 0) -> ManifestTask:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"manifest {path} not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        unknown = cols - COLUMNS
        if unknown:
            raise ValueError(f"manifest {path}: unknown columns {sorted(unknown)} (allowed: {sorted(COLUMNS)})")
        if not {"path", "label"} <= cols or not ({"split", "group"} & cols):
            raise ValueError(f"manifest {path}: needs columns path, label and split or group; has {sorted(cols)}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"manifest {path}: no rows")
    items = []
    for i, r in enumerate(rows, start=2):
        if not r.get("path") or not r.get("label"):
            raise ValueError(f"manifest {path}, line {i}: empty path or label")
        p = Path(r["path"])
        items.append({"path": str(p if p.is_absolute() else path.parent / p), "label": r["label"].strip(),
                      "split": (r.get("split") or "").strip(), "group": (r.get("group") or "").strip()})
    if "split" in cols and all(it["split"] for it in items):
        bad = sorted({it["split"] for it in items} - set(SPLITS))
        if bad:
            raise ValueError(f"manifest {path}: split values must be {SPLITS}, got {bad}")
    else:
        if any(not it["group"] for it in items):
            raise ValueError(f"manifest {path}: rows without a split need a group")
        assign = group_split([it["group"] for it in items], seed=seed)
        for it in items:
            it["split"] = it["split"] or assign[it["group"]]
    task = ManifestTask(name or path.stem, domain, items)
    train_labels = {it["label"] for it in task.split("train")}
    if not train_labels:
        raise ValueError(f"manifest {path}: the train split is empty")
    only_eval = sorted({it["label"] for it in items if it["split"] != "train"} - train_labels)
    if only_eval:
        raise ValueError(f"manifest {path}: labels {only_eval[:5]} occur only outside train")
    for s in ("val", "test"):
        if not task.split(s):
            raise ValueError(f"manifest {path}: the {s} split is empty")
    counts = {c: sum(it["label"] == c for it in task.split("train")) for c in train_labels}
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise ValueError(f"manifest {path}: classes {empty} have no training examples")
    return task
