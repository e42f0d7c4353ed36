"""Evaluation tasks built from audio that Debian's archive ships, fetched without root.

``fetch_package(name, cache)`` runs ``apt-get download NAME`` in ``cache/debs`` and unpacks it with
``dpkg-deb -x`` into ``cache/root/NAME``; the package's version and licence (from its copyright file) are
recorded in ``cache/packages.json``. Task builders turn unpacked files into a manifest
(``cache/tasks/<task>/manifest.csv``: path, label, split, group) whose splits keep groups apart.

Built so far:
- ``hedgewars_voice_id`` (speech): which of the 15 Hedgewars voice packs (package ``hedgewars-data``)
  speaks, tested on phrases never heard in training (split by phrase).
- ``hedgewars_phrase_id`` (speech): which phrase is said, tested on voice packs never heard in training
  (split by voice pack; phrases no training voice says are dropped).
- ``ufoai_sfx`` (environment): sound-effect class (weapons, ambience, footsteps, aliens, ...) of the UFO:AI
  effects in package ``ufoai-sound``; a group is one recording (its folder and name without the take
  number, so ``hurt1`` ... ``hurt9`` of one creature stay together), split per class so every class is
  in train, val and test.
"""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

from .tasks import group_split

DEFAULT_CACHE = Path.home() / ".cache" / "bestrq2" / "eval"


def fetch_package(name: str, cache: Path) -> Path:
    """Download and unpack a Debian package (cached); returns its unpacked root."""
    root = cache / "root" / name
    if root.is_dir() and any(root.iterdir()):
        return root
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise ValueError(f"fetching {name} needs apt-get and dpkg-deb (a Debian-based system)")
    res = subprocess.run(["apt-get", "download", name], cwd=debs, capture_output=True, text=True)
    if not sorted(debs.glob(f"{name}_*.deb")):  # a fresh machine has no package lists yet: fetch them once
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        res = subprocess.run(["apt-get", "download", name], cwd=debs, capture_output=True, text=True)
    found = sorted(debs.glob(f"{name}_*.deb"))
    if not found:
        raise ValueError(f"apt-get download {name} failed: {res.stderr.strip()[-500:]} "
                         "(run `apt-get update` first if the package lists are empty)")
    deb = found[-1]
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True).stdout.strip()
    licences = []
    copyright_file = tmp / "usr" / "share" / "doc" / name / "copyright"
    if copyright_file.is_file():
        licences = sorted({m.group(1).strip() for m in re.finditer(r"^License:\s*(\S.*)$",
                                                                   copyright_file.read_text(errors="replace"), re.M)})
    tmp.rename(root)
    record = cache / "packages.json"
    meta = json.loads(record.read_text()) if record.exists() else {}
    meta[name] = {"version": version, "licences": licences, "deb": deb.name}
    record.write_text(json.dumps(meta, indent=1, sort_keys=True))
    return root


def stratified_group_split(rows: list[dict], seed: int = 0, min_groups: int = 3) -> tuple[list[dict], list[str]]:
    """Split groups per label (so each label reaches train, val and test); labels with fewer than
    ``min_groups`` groups are dropped and returned."""
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    kept, dropped = [], []
    for label, items in sorted(by_label.items()):
        groups = [it["group"] for it in items]
        if len(set(groups)) < min_groups:
            dropped.append(label)
            continue
        assign = group_split(groups, seed=seed)
        for it in items:
            kept.append({**it, "split": assign[it["group"]]})
    return kept, dropped


def write_manifest(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "split", "group"])
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in ("path", "label", "split", "group")})
    return path


def build_ufoai_sfx(cache: Path, seed: int = 0, limit: int | None = None) -> Path:
    """Environment task: UFO:AI sound-effect class, split by recording. ``limit`` keeps a few files per
    class (for smoke runs)."""
    root = fetch_package("ufoai-sound", cache)
    pk3s = sorted(root.rglob("*.pk3"))
    if not pk3s:
        raise ValueError(f"ufoai-sound: no .pk3 archive under {root}")
    out = cache / "tasks" / ("ufoai_sfx" if limit is None else f"ufoai_sfx_{limit}")
    audio = out / "audio"
    rows, per_label = [], {}
    for pk3 in pk3s:
        with zipfile.ZipFile(pk3) as z:
            for n in sorted(z.namelist()):
                parts = n.split("/")
                if not n.endswith(".ogg") or len(parts) < 3 or parts[0] != "sound":
                    continue
                label = parts[1]
                if limit is not None and per_label.get(label, 0) >= limit:
                    continue
                per_label[label] = per_label.get(label, 0) + 1
                dest = audio / "/".join(parts[1:])
                if not dest.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(z.read(n))
                stem = re.sub(r"[_-]?\d+$", "", Path(n).stem)  # take number off: one recording per group
                rows.append({"path": str(dest.relative_to(out)), "label": label,
                             "group": "/".join(parts[1:-1] + [stem])})
    kept, dropped = stratified_group_split(rows, seed=seed)
    if not kept:
        raise ValueError("ufoai_sfx: no class has 3 or more recordings")
    (out / "dropped_labels.json").write_text(json.dumps(dropped))
    return write_manifest(kept, out / "manifest.csv")


def _hedgewars_rows(cache: Path, limit: int | None) -> list[dict]:
    root = fetch_package("hedgewars-data", cache)
    voices = sorted(p for p in root.rglob("voices") if p.is_dir())
    if not voices:
        raise ValueError(f"hedgewars-data: no voices folder under {root}")
    rows, per_pack = [], {}
    for f in sorted(voices[0].glob("*/*.ogg")):
        pack = f.parent.name
        if limit is not None and per_pack.get(pack, 0) >= limit:
            continue
        per_pack[pack] = per_pack.get(pack, 0) + 1
        phrase = re.sub(r"\d+$", "", f.stem).lower()  # Ooff1/Ooff2 are takes of one phrase
        rows.append({"path": str(f), "pack": pack, "phrase": phrase})
    return rows


def build_hedgewars_voice_id(cache: Path, seed: int = 0, limit: int | None = None) -> Path:
    """Speech: which voice pack speaks, tested on phrases never heard in training (split by phrase)."""
    rows = _hedgewars_rows(cache, limit)
    assign = group_split([r["phrase"] for r in rows], seed=seed)
    out = [{"path": r["path"], "label": r["pack"], "group": r["phrase"], "split": assign[r["phrase"]]} for r in rows]
    name = "hedgewars_voice_id" if limit is None else f"hedgewars_voice_id_{limit}"
    return write_manifest(out, cache / "tasks" / name / "manifest.csv")


def build_hedgewars_phrase_id(cache: Path, seed: int = 0, limit: int | None = None) -> Path:
    """Speech: which phrase is said, tested on voice packs never heard in training (split by pack).
    Phrases not spoken by any training voice are dropped."""
    rows = _hedgewars_rows(cache, limit)
    assign = group_split([r["pack"] for r in rows], seed=seed)
    train_phrases = {r["phrase"] for r in rows if assign[r["pack"]] == "train"}
    out = [{"path": r["path"], "label": r["phrase"], "group": r["pack"], "split": assign[r["pack"]]}
           for r in rows if r["phrase"] in train_phrases]
    name = "hedgewars_phrase_id" if limit is None else f"hedgewars_phrase_id_{limit}"
    return write_manifest(out, cache / "tasks" / name / "manifest.csv")


TASKS = {
    "ufoai_sfx": ("environment", build_ufoai_sfx),
    "hedgewars_voice_id": ("speech", build_hedgewars_voice_id),
    "hedgewars_phrase_id": ("speech", build_hedgewars_phrase_id),
}


def prepare_tasks(cache: Path = DEFAULT_CACHE, names: list[str] | None = None, seed: int = 0,
                  limit: int | None = None) -> dict[str, tuple[str, Path]]:
    """Build the named (default: all) tasks; returns {task: (domain, manifest)}. A task whose package
    cannot be fetched or unpacked is reported and skipped."""
    made = {}
    for name in names or list(TASKS):
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
        domain, build = TASKS[name]
        try:
            made[name] = (domain, build(cache, seed=seed, limit=limit))
        except (ValueError, subprocess.CalledProcessError, OSError) as err:
            print(f"task {name}: skipped ({err})")
    return made
