"""A real pretraining corpus from audio that Debian's archive ships: ``bestrq2 prepare --debian PKG... OUT``.

Packages are fetched as the eval tasks' are (``apt-get download``, ``dpkg-deb -x``, no root; version
and licences recorded), their wav / ogg / opus / flac / mp3 files decoded once into prepared shards
(``bestrq2.data.shards.prepare``). ``OUT/packages.json`` records per package its version, licences,
files and hours of audio. A package that a built-in eval task uses is refused: nothing heard in
evaluation is pretrained on.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..config import SAMPLE_RATE
from .folder import EXTENSIONS, audio_files

# The default set (game and education packages with sound effects, music and spoken words)
DEFAULT_PACKAGES = ["ktuberling-data", "wesnoth-1.16-music", "supertux-data", "redeclipse-data", "megaglest-data",
                    "warzone2100-music", "neverball-data", "openclonk-data", "extremetuxracer-data",
                    "lincity-ng-data", "frozen-bubble-data", "pingus-data", "tuxpaint-data", "openttd-opensfx",
                    "minetest-data"]


def eval_packages() -> set[str]:
    """Every package a built-in eval task is built from (never pretrained on)."""
    from ..eval.debian import SOUNDFONTS, TTS_PACKAGES

    return {"ufoai-sound", "hedgewars-data", "hydrogen-drumkits", *TTS_PACKAGES, *(p for p, _ in SOUNDFONTS.values())}


def prepare_debian(packages: list[str], out: str | Path, cache: str | Path | None = None, workers: int | None = None,
                   progress: bool = True) -> dict:
    """Fetch ``packages`` (``["default"]``: ``DEFAULT_PACKAGES``) and prepare their audio into OUT.
    Returns prepare's result plus {"packages": {name: {version, licences, files, hours}}, "failed": {name: why}}."""
    from ..eval.debian import DEFAULT_CACHE, fetch_package
    from .shards import prepare

    if packages == ["default"]:
        packages = list(DEFAULT_PACKAGES)
    banned = sorted(set(packages) & eval_packages())
    if banned:
        raise ValueError(f"--debian: {banned} feed the built-in eval tasks; pretraining on them would put test "
                         "audio in training")
    cache = Path(cache) if cache else DEFAULT_CACHE
    out = Path(out)
    if (out / "index.json").exists():
        raise ValueError(f"prepare: {out} already holds a prepared corpus (index.json); choose another OUT")
    staging = cache / "corpus-src" / out.resolve().name
    shutil.rmtree(staging, ignore_errors=True)
    found, failed = {}, {}
    for name in packages:
        try:
            root = fetch_package(name, cache)
        except (ValueError, OSError) as err:
            failed[name] = str(err)[:300]
            print(f"package {name}: skipped ({failed[name]})")
            continue
        files = audio_files(root)
        if not files:
            failed[name] = f"no audio files ({'/'.join(sorted(e.lstrip('.') for e in EXTENSIONS))})"
            print(f"package {name}: no audio files, skipped")
            continue
        for f in files:  # a staging tree of links: <package>/<path in the package>
            link = staging / name / f.relative_to(root)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(f)
        found[name] = len(files)
    if not found:
        raise ValueError(f"--debian: none of {packages} gave audio ({failed})")
    res = prepare(staging, out, workers=workers, progress=progress)
    index = json.loads((out / "index.json").read_text())["clips"]
    meta = json.loads((cache / "packages.json").read_text()) if (cache / "packages.json").exists() else {}
    per = {name: {"version": meta.get(name, {}).get("version"), "licences": meta.get(name, {}).get("licences", []),
                  "files": n, "clips": 0, "hours": 0.0} for name, n in found.items()}
    for e in index:
        pkg = Path(e["source"]).parts[0]
        per[pkg]["clips"] += 1
        per[pkg]["hours"] += e["length"] / SAMPLE_RATE / 3600
    (out / "packages.json").write_text(json.dumps({"packages": per, "failed": failed}, indent=1))
    res.update(packages=per, failed=failed)
    return res
