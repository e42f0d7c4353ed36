"""Tasks: a labelled set of audio files with train/val/test splits that keep groups apart.

A manifest is a CSV with columns ``path,label`` and either ``split`` (train | val | test) or
``group`` (speaker, voice pack, soundfont, recording ...). With groups, splits are made by group so
that no group is in two splits. Paths are relative to the manifest's folder unless absolute.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test"}
COLUMNS = {"path", "label", "split", "group", "domain"}  # others are ignored (and listed once)


@dataclass
class ManifestTask:
    name: str
    domain: str
    items: list[dict] = field(default_factory=list)  # {"path", "label", "split", "group"}
    ignored_columns: list[str] = field(default_factory=list)

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


def _task_json(path: Path) -> dict:
    meta = path.parent / "task.json"
    if not meta.is_file():
        return {}
    try:
        data = json.loads(meta.read_text())
    except ValueError as err:
        raise ValueError(f"{meta}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{meta}: expected an object like {{\"name\": ..., \"domain\": ...}}")
    return data


def read_manifest(path: str | Path, name: str | None = None, domain: str | None = None, seed: int = 0) -> ManifestTask:
    """Read and validate a manifest (no audio is opened). Task name: ``name``, else ``task.json``'s
    "name" beside it, else the folder's name when the file is ``manifest.csv``, else the file's stem.
    Domain: ``domain``, else the manifest's ``domain`` column (one value), else ``task.json``'s
    "domain", else "custom". Split names: train / val / test and the aliases valid, validation, dev,
    training, testing (any case)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"manifest {path} not found")
    meta = _task_json(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = cols
        if not {"path", "label"} <= set(cols) or not ({"split", "group"} & set(cols)):
            raise ValueError(f"manifest {path}: needs columns path, label and split or group; has {sorted(cols)}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"manifest {path}: no rows")
    items, domains = [], set()
    for i, r in enumerate(rows, start=2):
        p, label = (r.get("path") or "").strip(), (r.get("label") or "").strip()
        if not p:
            raise ValueError(f"manifest {path}, line {i}: empty path")
        if not label:
            raise ValueError(f"manifest {path}, line {i}: blank label for {p}")
        split = (r.get("split") or "").strip()
        if split:
            if split.lower() not in SPLIT_ALIASES:
                raise ValueError(f"manifest {path}, line {i}: split {split!r} is none of {SPLITS} "
                                 f"(or {sorted(set(SPLIT_ALIASES) - set(SPLITS))})")
            split = SPLIT_ALIASES[split.lower()]
        if (r.get("domain") or "").strip():
            domains.add(r["domain"].strip())
        pp = Path(p)
        items.append({"path": str(pp if pp.is_absolute() else path.parent / pp), "label": label,
                      "split": split, "group": (r.get("group") or "").strip()})
    if len(domains) > 1:
        raise ValueError(f"manifest {path}: one task has one domain; the domain column holds {sorted(domains)}")
    if not all(it["split"] for it in items):
        if any(not it["split"] and not it["group"] for it in items):
            raise ValueError(f"manifest {path}: rows without a split need a group")
        assign = group_split([it["group"] for it in items if not it["split"]], seed=seed)
        for it in items:
            it["split"] = it["split"] or assign[it["group"]]
    if name is None:
        name = meta.get("name") or (path.parent.name if path.name == "manifest.csv" else path.stem)
    domain = domain or (domains.pop() if domains else None) or meta.get("domain") or "custom"
    task = ManifestTask(str(name), str(domain), items, sorted(set(cols) - COLUMNS))
    train_labels = {it["label"] for it in task.split("train")}
    if not train_labels:
        raise ValueError(f"manifest {path}: the train split is empty")
    only_eval = sorted({it["label"] for it in items if it["split"] != "train"} - train_labels)
    if only_eval:
        raise ValueError(f"manifest {path}: labels {only_eval[:5]} occur only outside train")
    for s in ("val", "test"):
        if not task.split(s):
            raise ValueError(f"manifest {path}: the {s} split is empty")
    return task


def cv_folds(items: list[dict], k: int | str, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """Cross-validation over groups (each item its own group when the manifest has none): K folds of
    whole groups balanced by item count, or leave-one-group-out for ``k == "groups"``. Fold i tests on
    its groups, validates on fold i + 1's and trains on the rest, so every item is tested exactly once.
    Returns (train, val, test) index lists per fold."""
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it["group"] or f"item:{i}", []).append(i)
    order = sorted(groups, key=lambda g: hashlib.sha1(f"{seed}:{g}".encode()).hexdigest())
    if k == "groups":
        folds = [groups[g] for g in order]
    else:
        k = int(k)
        if k < 3:
            raise ValueError(f"--cv needs K >= 3 (train, val and test folds), got {k}")
        if k > len(order):
            raise ValueError(f"--cv {k}: only {len(order)} groups to spread over the folds")
        folds = [[] for _ in range(k)]
        for g in sorted(order, key=lambda g: -len(groups[g])):  # largest first onto the lightest fold
            min(folds, key=len).extend(groups[g])
    if len(folds) < 3:
        raise ValueError(f"cross-validation needs at least 3 groups, got {len(folds)}")
    out = []
    for i in range(len(folds)):
        test, val = sorted(folds[i]), sorted(folds[(i + 1) % len(folds)])
        train = sorted(j for f, fold in enumerate(folds) if f not in (i, (i + 1) % len(folds)) for j in fold)
        out.append((train, val, test))
    return out
