"""Evaluation tasks built from audio that Debian's archive ships, fetched without root.

``fetch_package(name, cache)`` runs ``apt-get download NAME`` in ``cache/debs`` and unpacks it with
``dpkg-deb -x`` into ``cache/root/NAME``; the package's version and licence (from its copyright file) are
recorded in ``cache/packages.json``. Task builders turn unpacked files into a manifest
(``cache/tasks/<task>/manifest.csv``: path, label, split, group) whose splits keep groups apart.

Tasks (see ``TASKS``; each builder's docstring says how it splits):
- ``ufoai_sfx`` (environment): UFO:AI sound-effect class (package ``ufoai-sound``), split by recording
  within each class (``hurt1`` ... ``hurt9`` of one creature stay together).
- ``hedgewars_voice_id`` / ``hedgewars_phrase_id`` (speech): which of the Hedgewars voice packs speaks
  (split by phrase) / which phrase is said (split by voice pack).
- ``tts_digits`` (speech): spoken digits, espeak-ng and Festival voices for training, flite's for test.
- ``hydrogen_drums`` (music): drum piece, split by Hydrogen drum kit.
- ``gm_instruments`` (music): General MIDI instrument family, one soundfont per split.
"""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

from ..config import SAMPLE_RATE
from ..env import read
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


GM_FAMILIES = ["piano", "chromatic_percussion", "organ", "guitar", "bass", "strings", "ensemble", "brass", "reed",
               "pipe", "synth_lead", "synth_pad", "synth_effects", "ethnic", "percussive", "sound_effects"]
SOUNDFONTS = {"train": ("fluid-soundfont-gm", "FluidR3_GM.sf2"), "val": ("timgm6mb-soundfont", "TimGM6mb.sf2"),
              "test": ("musescore-general-soundfont", "MuseScore_General_Full.sf3")}


def build_gm_instruments(cache: Path, seed: int = 0, limit: int | None = None) -> Path:
    """Music: General MIDI instrument family (piano, organ, guitar, bass, strings, brass, reed, pipe, ...;
    the synth-effects and sound-effects families are left out) of single notes (C3, C4, C5) rendered
    from one soundfont per split: FluidR3 (train), TimGM6mb (val), MuseScore General (test), so no test
    sample set is heard in training. Rendered by ``bestrq2.eval.soundfont`` (see there why not
    fluidsynth). ``limit`` keeps that many programs per family (smoke runs)."""
    import soundfile as sf

    from .soundfont import SoundFont

    out = cache / "tasks" / ("gm_instruments" if limit is None else f"gm_instruments_{limit}")
    audio = out / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, (package, filename) in SOUNDFONTS.items():
        found = sorted(fetch_package(package, cache).rglob(filename))
        if not found:
            raise ValueError(f"{package}: {filename} not found")
        font = None
        for program in range(128):
            family = GM_FAMILIES[program // 8]
            if family in ("synth_effects", "sound_effects") or (limit is not None and program % 8 >= limit):
                continue
            for key in (48, 60, 72):
                dest = audio / split / f"{program:03d}_{key}.wav"
                if not dest.exists():
                    font = font or SoundFont(found[0])
                    if (0, program) not in font.presets:
                        continue
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    sf.write(dest, font.render(program, key), SAMPLE_RATE, subtype="PCM_16")
                rows.append({"path": str(dest.relative_to(out)), "label": family, "group": package, "split": split})
    return write_manifest(rows, out / "manifest.csv")


# Drum-kit instrument names -> piece; the first pattern that matches wins ("Snare Rimshot" is a snare).
DRUM_PIECES = [("kick", r"kick|bass ?drum"), ("hihat", r"hat\b|hh\b|hi-?hat"), ("snare", r"snare"),
               ("clap", r"clap"), ("cowbell", r"cowbell"), ("tom", r"\btom"), ("crash", r"crash"),
               ("ride", r"ride"), ("rim", r"stick|rim")]


def drum_piece(name: str) -> str | None:
    low = name.lower()
    return next((piece for piece, pat in DRUM_PIECES if re.search(pat, low)), None)


def build_hydrogen_drums(cache: Path, seed: int = 0, limit: int | None = None) -> Path:
    """Music: drum piece (kick, snare, hi-hat, tom, crash, ride, clap, cowbell, rim/stick) of the
    Hydrogen drum-kit samples (package ``hydrogen-drumkits``), tested on kits never heard in training
    (split by kit); every velocity layer is a clip. Pieces no training kit has are dropped."""
    import xml.etree.ElementTree as ET

    root = fetch_package("hydrogen-drumkits", cache)
    kits = sorted(p.parent for p in root.rglob("drumkit.xml"))
    if len(kits) < 3:
        raise ValueError(f"hydrogen-drumkits: {len(kits)} kits under {root}, need 3 or more")
    rows = []
    for kit in kits:
        tree = ET.parse(kit / "drumkit.xml").getroot()
        ns = tree.tag[: tree.tag.index("}") + 1] if tree.tag.startswith("{") else ""
        per_piece: dict[str, int] = {}
        for ins in tree.iter(ns + "instrument"):
            piece = drum_piece(ins.findtext(ns + "name") or "")
            if piece is None:
                continue
            for fn in ins.iter(ns + "filename"):
                f = kit / (fn.text or "")
                if not fn.text or not f.is_file() or (limit is not None and per_piece.get(piece, 0) >= limit):
                    continue
                per_piece[piece] = per_piece.get(piece, 0) + 1
                rows.append({"path": str(f), "label": piece, "group": kit.name})
    # split the kits by number, not by sample count: a few big multi-layer kits would otherwise leave
    # one small kit for test
    assign = group_split(sorted({r["group"] for r in rows}), fractions=(0.6, 0.15, 0.25), seed=seed)
    train_pieces = {r["label"] for r in rows if assign[r["group"]] == "train"}
    out = [{**r, "split": assign[r["group"]]} for r in rows if r["label"] in train_pieces]
    name = "hydrogen_drums" if limit is None else f"hydrogen_drums_{limit}"
    return write_manifest(out, cache / "tasks" / name / "manifest.csv")


# espeak-ng and flite run from their unpacked packages: the programs, their libraries and the
# libraries those need that a minimal Debian 12 image lacks (names are Debian 12's).
TTS_PACKAGES = ["espeak-ng", "libespeak-ng1", "espeak-ng-data", "libpcaudio0", "libsonic0", "libpulse0",
                "libsndfile1", "libasyncns0", "libflac12", "libvorbis0a", "libvorbisenc2", "libopus0", "libogg0",
                "libmpg123-0", "libmp3lame0", "flite", "libflite1",
                "festival", "libestools2.5", "libasound2", "libgomp1", "festlex-cmu", "festlex-poslex",
                "festvox-kdlpc16k", "festvox-kdlpc8k"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ESPEAK_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2",
                   "klatt3", "klatt4", "croak", "whisper", "Andy", "Annie", "Denis", "Gene", "Mr serious", "edward"]
FLITE_VOICES = ["kal", "kal16", "awb", "rms", "slt"]
# Festival's English voices in Debian 12 are kal (the speaker of flite's kal/kal16), ked (16 and 8 kHz
# diphone sets) and the US slt HTS voice (the speaker of flite's slt): only ked is a speaker flite lacks.
FESTIVAL_VOICES = {"ked": "ked_diphone"}  # group name: Festival voice (its kdlpc16k and kdlpc8k builds)


def _tts_env(cache: Path) -> tuple[dict, Path, Path, Path, Path]:
    import os

    roots = [fetch_package(p, cache) for p in TTS_PACKAGES]
    libdirs = sorted({str(f.parent) for r in roots for f in r.rglob("*.so*")})
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(libdirs + [read("LD_LIBRARY_PATH")]))
    espeak = cache / "root" / "espeak-ng" / "usr" / "bin" / "espeak-ng"
    flite = cache / "root" / "flite" / "usr" / "bin" / "flite"
    data = next((d for d in (cache / "root" / "espeak-ng-data").rglob("espeak-ng-data") if (d / "phontab").exists()),
                None)
    festival = cache / "root" / "festival" / "usr" / "bin" / "festival"
    if data is None or not espeak.exists() or not flite.exists() or not festival.exists():
        raise ValueError("espeak-ng/flite/festival: unpacked packages lack the programs or espeak-ng-data")
    return env, espeak, flite, data.parent, festival


def _festival_cmd(cache: Path, festival: Path, voice_dir: Path, voice: str, stretch: float, text: str) -> list[str]:
    """A Festival batch call that writes `text` in `voice` to OUT. Festival reads its Scheme files from
    --libdir/--datadir; the voice and the lexicons sit in other packages' unpacked trees, so the lexicon
    folders are set (and pos.scm reloaded to pick up its one), the voice registered in voice-locations
    and its definition loaded by path."""
    share = cache / "root" / "festival" / "usr" / "share" / "festival"
    dicts = [cache / "root" / p / "usr" / "share" / "festival" / "dicts" for p in ("festlex-cmu", "festlex-poslex")]
    setup = [f'(set! lexdir "{dicts[0]}/")', f'(set! pos_model_dir "{dicts[1]}/")',
             f'(load "{share}/pos.scm")',  # it defines the POS lexicon from pos_model_dir when loaded
             f'(set! voice-locations (cons (cons (quote {voice}) "{voice_dir}/{voice}/") voice-locations))',
             f'(load "{voice_dir}/{voice}/festvox/{voice}.scm")',
             f"(voice_{voice})", f"(Parameter.set 'Duration_Stretch {stretch})",
             f'(utt.save.wave (utt.synth (Utterance Text "{text}")) "OUT" (quote riff))']
    return [str(festival), "--libdir", f"{share}/", "--datadir", f"{share}/", "-b", *setup]


def build_tts_digits(cache: Path, seed: int = 0, limit: int | None = None) -> Path:
    """Speech: spoken digit (zero ... nine), trained on espeak-ng voices and Festival's ked voice (val:
    other espeak-ng voices), tested on flite's voices, a synthesiser (and speakers) never heard in
    training. Each voice at three speaking rates. ``limit`` keeps that many voices per synthesiser."""
    env, espeak, flite, data, festival = _tts_env(cache)
    out = cache / "tasks" / ("tts_digits" if limit is None else f"tts_digits_{limit}")
    audio = out / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    variants = ESPEAK_VARIANTS[: limit or None]
    voices = FLITE_VOICES[: limit or None]
    val = set(variants[::5]) if len(variants) > 2 else set(variants[-1:])
    rows = []

    def render(cmd: list[str], dest: Path) -> None:
        """Run a synthesiser whose command writes to the placeholder OUT; keep the file only if it worked."""
        if dest.exists():
            return
        tmp = dest.with_name(dest.stem + ".part.wav")
        cmd = [str(tmp) if c == "OUT" else c.replace('"OUT"', f'"{tmp}"') for c in cmd]  # an argument, or a
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)              # Scheme string
        if res.returncode or not tmp.exists():
            raise ValueError(f"{Path(cmd[0]).name} failed: {res.stderr.strip()[-300:]}")
        tmp.rename(dest)

    for v in variants:
        for rate in (130, 165, 200):
            for d in DIGITS:
                dest = audio / f"espeak_{v.replace(' ', '_')}_{rate}_{d}.wav"
                render([str(espeak), f"--path={data}", "-v", f"en+{v}", "-s", str(rate), "-w", "OUT", d], dest)
                rows.append({"path": str(dest.relative_to(out)), "label": d, "group": f"espeak:{v}",
                             "split": "val" if v in val else "train"})
    for group, voice in list(FESTIVAL_VOICES.items())[: limit or None]:
        for pkg in ("festvox-kdlpc16k", "festvox-kdlpc8k"):
            voice_dir = cache / "root" / pkg / "usr" / "share" / "festival" / "voices" / "english"
            for stretch in (0.8, 1.0, 1.25):
                for d in DIGITS:
                    dest = audio / f"festival_{voice}_{pkg[-3:]}_{stretch}_{d}.wav"
                    render(_festival_cmd(cache, festival, voice_dir, voice, stretch, d), dest)
                    rows.append({"path": str(dest.relative_to(out)), "label": d, "group": f"festival:{group}",
                                 "split": "train"})
    for v in voices:
        for stretch in (0.8, 1.0, 1.25):
            for d in DIGITS:
                dest = audio / f"flite_{v}_{stretch}_{d}.wav"
                render([str(flite), "-voice", v, "--setf", f"duration_stretch={stretch}", "-t", d, "-o", "OUT"], dest)
                rows.append({"path": str(dest.relative_to(out)), "label": d, "group": f"flite:{v}", "split": "test"})
    return write_manifest(rows, out / "manifest.csv")


TASKS = {
    "ufoai_sfx": ("environment", build_ufoai_sfx),
    "hedgewars_voice_id": ("speech", build_hedgewars_voice_id),
    "hedgewars_phrase_id": ("speech", build_hedgewars_phrase_id),
    "tts_digits": ("speech", build_tts_digits),
    "hydrogen_drums": ("music", build_hydrogen_drums),
    "gm_instruments": ("music", build_gm_instruments),
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
