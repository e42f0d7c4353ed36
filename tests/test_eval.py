"""Evaluation pieces: probe and kNN on features with a known answer, group splits, manifests, and a
smoke run of `bestrq2 eval` on a small synthetic task."""
import csv
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from bestrq2 import BestRQ2Config, BestRQ2Encoder
from bestrq2.cli import main
from bestrq2.eval import group_split, knn_classify, linear_probe, read_manifest
from bestrq2.eval.suite import summarize, TaskScore


def clusters(n_per, dim=16, classes=3, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 3
    x = torch.cat([centers[c] + spread * torch.randn(n_per, dim, generator=g) for c in range(classes)])
    return x, torch.arange(classes).repeat_interleave(n_per)


def test_probe_and_knn_find_separable_classes():
    x, y = clusters(70, seed=1)
    idx = torch.randperm(210, generator=torch.Generator().manual_seed(0))
    tr, va, te = (x[idx[:120]], y[idx[:120]]), (x[idx[120:150]], y[idx[120:150]]), (x[idx[150:]], y[idx[150:]])
    res = linear_probe(tr, va, te, 3, epochs=200)  # 2 batches an epoch: 400 Adam steps at <= 1e-3
    assert res.test_accuracy >= 0.95 and res.val_accuracy >= 0.95
    assert knn_classify(tr, te, 3).test_accuracy >= 0.95


def test_probe_is_at_chance_on_random_labels():
    x = torch.randn(300, 16)
    y = torch.randint(0, 4, (300,))
    res = linear_probe((x[:200], y[:200]), (x[200:250], y[200:250]), (x[250:], y[250:]), 4, epochs=20)
    assert res.test_accuracy < 0.5  # chance is 0.25
    assert knn_classify((x[:200], y[:200]), (x[250:], y[250:]), 4).test_accuracy < 0.5


def test_knn_weighting_and_errors():
    tr = (torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]]), torch.tensor([0, 1, 0]))
    te = (torch.tensor([[0.0, 2.0], [3.0, 0.2]]), torch.tensor([1, 0]))
    assert knn_classify(tr, te, 2, k=1).test_accuracy == 1.0
    with pytest.raises(ValueError, match="NaN"):
        knn_classify(tr, (torch.tensor([[float("nan"), 0.0]]), torch.tensor([0])), 2)
    with pytest.raises(ValueError, match="labels"):
        linear_probe(tr, tr, (tr[0], tr[1][:2]), 2)


def test_group_split_keeps_groups_apart():
    groups = [f"spk{i % 13}" for i in range(200)]
    split = group_split(groups, seed=4)
    assert set(split) == set(groups) and set(split.values()) == {"train", "val", "test"}
    assert split == group_split(groups, seed=4) and split != group_split(groups, seed=5)
    n_train = sum(split[g] == "train" for g in groups)
    assert 0.5 < n_train / 200 < 0.85
    assert group_split(["a", "b", "c"]).values().__len__() == 3
    with pytest.raises(ValueError, match="at least 3 groups"):
        group_split(["a", "b", "a"])


def write_manifest(path, rows, cols):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


def test_manifest_reader_errors(tmp_path):
    ok = [{"path": f"a{i}.wav", "label": "x" if i % 2 else "y", "group": f"g{i % 5}"} for i in range(20)]
    task = read_manifest(write_manifest(tmp_path / "ok.csv", ok, ["path", "label", "group"]))
    for s in ("train", "val", "test"):
        assert task.split(s)
    by_group = {}
    for it in task.items:
        by_group.setdefault(it["group"], set()).add(it["split"])
    assert all(len(v) == 1 for v in by_group.values())
    with pytest.raises(ValueError, match="unknown columns"):
        read_manifest(write_manifest(tmp_path / "u.csv", [{"path": "a", "label": "x", "speaker": "s"}],
                                     ["path", "label", "speaker"]))
    rows = [{"path": "a", "label": "x", "split": "train"}, {"path": "b", "label": "x", "split": "val"},
            {"path": "c", "label": "z", "split": "test"}]
    with pytest.raises(ValueError, match="only outside train"):
        read_manifest(write_manifest(tmp_path / "t.csv", rows, ["path", "label", "split"]))
    rows[2]["split"] = "dev"
    with pytest.raises(ValueError, match="split values"):
        read_manifest(write_manifest(tmp_path / "d.csv", rows, ["path", "label", "split"]))
    with pytest.raises(ValueError, match="empty path or label"):
        read_manifest(write_manifest(tmp_path / "e.csv", [{"path": "a", "label": "", "split": "train"}],
                                     ["path", "label", "split"]))
    with pytest.raises(ValueError, match="not found"):
        read_manifest(tmp_path / "missing.csv")


def test_summary_weights_by_test_size():
    rs = [TaskScore("a", "speech", 10, {"m/probe": 1.0}), TaskScore("b", "music", 30, {"m/probe": 0.5})]
    s = summarize(rs)
    assert s["overall"]["m/probe"] == pytest.approx((10 * 1.0 + 30 * 0.5) / 40)
    assert s["speech"]["m/probe"] == 1.0 and s["music"]["m/probe"] == 0.5


def test_eval_cli_smoke(tmp_path, capsys):
    """Tones vs noise bursts, 6 recording groups; an unreadable file is reported and skipped."""
    rng = np.random.default_rng(0)
    rows = []
    for g in range(6):
        for j in range(4):
            t = np.arange(16000) / 16000
            tone = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t)
            noise = 0.3 * rng.standard_normal(16000)
            for label, x in (("tone", tone), ("noise", noise)):
                p = tmp_path / f"{label}{g}_{j}.wav"
                sf.write(p, x.astype(np.float32), 16000)
                rows.append({"path": p.name, "label": label, "group": f"rec{g}"})
    (tmp_path / "bad.wav").write_bytes(b"junk")
    rows.append({"path": "bad.wav", "label": "tone", "group": "rec0"})
    man = write_manifest(tmp_path / "task.csv", rows, ["path", "label", "group"])
    enc = BestRQ2Encoder(BestRQ2Config.preset("tiny", encoder_depth=1))
    enc.save_pretrained(tmp_path / "enc")
    out = tmp_path / "report.md"
    assert main(["eval", "--model", str(tmp_path / "enc"), "--manifest", str(man), "--epochs", "10",
                 "--domain", "environment", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1 unreadable files skipped" in text
    assert "logmel_stats/probe" in text and "random_init/knn" in text and "**environment**" in text
    summary = json.loads(out.with_suffix(".json").read_text())["summary"]["overall"]
    assert summary["logmel_stats/probe"] >= 0.9  # tones vs noise is easy from log-mel statistics


def test_stratified_group_split_reaches_every_split():
    from bestrq2.eval.debian import stratified_group_split

    rows = [{"path": f"{c}{i}", "label": c, "group": f"{c}-rec{i // 2}"} for c in "abc" for i in range(12)]
    rows += [{"path": "z1", "label": "z", "group": "z1"}, {"path": "z2", "label": "z", "group": "z2"}]
    kept, dropped = stratified_group_split(rows, seed=1)
    assert dropped == ["z"]  # two recordings cannot fill train, val and test
    for c in "abc":
        assert {r["split"] for r in kept if r["label"] == c} == {"train", "val", "test"}
    where = {}
    for r in kept:
        where.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in where.values())


def test_builtin_debian_task_smoke(tmp_path, capsys):
    """The real package: apt-get download + dpkg-deb -x of ufoai-sound (18 MB), a few files per class,
    version and licence recorded, then the whole eval path with both floors."""
    import shutil

    if shutil.which("apt-get") is None:
        pytest.fail("the built-in tasks need a Debian-based machine (apt-get, dpkg-deb)")
    cache = tmp_path / "cache"
    enc = BestRQ2Encoder(BestRQ2Config.preset("tiny", encoder_depth=1))
    enc.save_pretrained(tmp_path / "enc")
    assert main(["eval", "--builtin", "--tasks", "ufoai_sfx", "--cache", str(cache), "--limit", "6",
                 "--model", str(tmp_path / "enc"), "--epochs", "3", "--out", str(tmp_path / "r.md")]) == 0
    meta = json.loads((cache / "packages.json").read_text())["ufoai-sound"]
    assert meta["version"] and "CC-BY-3.0" in meta["licences"]
    rows = list(csv.DictReader(open(cache / "tasks" / "ufoai_sfx_6" / "manifest.csv")))
    assert len({r["label"] for r in rows}) >= 10 and all(r["split"] in ("train", "val", "test") for r in rows)
    text = capsys.readouterr().out
    assert "| ufoai_sfx_6 | environment |" in text and "logmel_stats/probe" in text


def test_hedgewars_tasks_split_by_phrase_and_by_voice(tmp_path, monkeypatch):
    """The two speech tasks on a fake unpacked hedgewars-data (the real one is 145 MB: not in CI)."""
    import bestrq2.eval.debian as D

    root = tmp_path / "root" / "hedgewars-data"
    voices = root / "usr" / "share" / "games" / "hedgewars" / "Data" / "Sounds" / "voices"
    t = np.arange(4000) / 16000
    for k, pack in enumerate(["Pirate", "Robot", "Singer", "Surfer", "Mobster", "British"]):
        (voices / pack).mkdir(parents=True)
        for j, phrase in enumerate(["Hello", "Ooff1", "Ooff2", "Byebye", "Drat", "Oops", "Melon", "Hurry"]):
            x = 0.2 * np.sin(2 * np.pi * (150 + 40 * k + 300 * j) * t)
            sf.write(voices / pack / f"{phrase}.ogg", x.astype(np.float32), 16000)
    monkeypatch.setattr(D, "fetch_package", lambda name, cache: root)
    voice = read_manifest(D.build_hedgewars_voice_id(tmp_path, seed=0))
    phrase = read_manifest(D.build_hedgewars_phrase_id(tmp_path, seed=0))
    assert set(voice.classes) == {"Pirate", "Robot", "Singer", "Surfer", "Mobster", "British"}
    assert "ooff" in phrase.classes and "ooff1" not in phrase.classes  # takes of one phrase are one class
    for task, key in ((voice, "group"), (phrase, "group")):
        where = {}
        for it in task.items:
            where.setdefault(it[key], set()).add(it["split"])
        assert all(len(s) == 1 for s in where.values())  # no phrase (voice pack) in two splits
        assert {it["split"] for it in task.items} == {"train", "val", "test"}


# ----------------------------------------------------------------- soundfont renderer, music and digit tasks
def write_sf2(path, rate=16000, root=60, freq=None, programs=(0,), loop=True):
    """A minimal valid SF2: one sine sample (root key ``root``), one instrument with one looped zone,
    one preset per program pointing at it. Returns the sample's frequency."""
    import struct

    freq = freq or 440.0 * 2 ** ((root - 69) / 12)
    n = 4000
    x = (0.5 * np.sin(2 * np.pi * freq * np.arange(n + 46) / rate) * 32767).astype("<i2")
    period = rate / freq  # loop over a whole number of periods near the end keeps the sine continuous
    k = int((n - 2000) / period)
    ls, le = 2000, 2000 + int(round(k * period))

    def chunk(cid, data):
        return cid.encode() + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")

    def lst(kind, *chunks):
        return chunk("LIST", kind.encode() + b"".join(chunks))

    phdr = b"".join(struct.pack("<20sHHHIII", b"p%d" % p, p, 0, i, 0, 0, 0) for i, p in enumerate(programs))
    phdr += struct.pack("<20sHHHIII", b"EOP", 0, 0, len(programs), 0, 0, 0)
    pbag = b"".join(struct.pack("<HH", i, 0) for i in range(len(programs) + 1))
    pgen = b"".join(struct.pack("<HH", 41, 0) for _ in programs) + struct.pack("<HH", 0, 0)
    inst = struct.pack("<20sH", b"sine", 0) + struct.pack("<20sH", b"EOI", 1)
    ibag = struct.pack("<HH", 0, 0) + struct.pack("<HH", 2, 0)
    igen = struct.pack("<HH", 54, 1 if loop else 0) + struct.pack("<HH", 53, 0) + struct.pack("<HH", 0, 0)
    shdr = struct.pack("<20sIIIIIBbHH", b"sine", 0, n, ls, le, rate, root, 0, 0, 1)
    shdr += struct.pack("<20sIIIIIBbHH", b"EOS", 0, 0, 0, 0, 0, 0, 0, 0, 0)
    body = b"sfbk" + lst("INFO", chunk("ifil", struct.pack("<HH", 2, 1))) + lst("sdta", chunk("smpl", x.tobytes())) + \
        lst("pdta", chunk("phdr", phdr), chunk("pbag", pbag), chunk("pmod", b"\0" * 10), chunk("pgen", pgen),
            chunk("inst", inst), chunk("ibag", ibag), chunk("imod", b"\0" * 10), chunk("igen", igen),
            chunk("shdr", shdr))
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return freq


def _peak_hz(x, sr=16000):
    w = x[1000:9000] * np.hanning(8000)
    spec = np.abs(np.fft.rfft(w, 1 << 16))
    return np.fft.rfftfreq(1 << 16, 1 / sr)[spec.argmax()]


def test_soundfont_render_pitch_loop_and_errors(tmp_path):
    from bestrq2.eval.soundfont import SoundFont

    f0 = write_sf2(tmp_path / "s.sf2", rate=22050, root=57)
    font = SoundFont(tmp_path / "s.sf2")
    x = font.render(0, 57, seconds=1.0, release=0.25)
    assert x.shape == (20000,) and abs(_peak_hz(x) - f0) < 2  # resampled 22.05 -> 16 kHz at the same pitch
    assert abs(_peak_hz(font.render(0, 69)) - 2 * f0) < 4  # an octave up
    assert np.abs(x[12000:15000]).max() > 0.3  # looped: sounds long after the 0.18 s sample ran out
    assert np.abs(x[-40:]).max() < 0.01  # released
    write_sf2(tmp_path / "once.sf2", loop=False)
    y = SoundFont(tmp_path / "once.sf2").render(0, 60)
    assert np.abs(y[8000:]).max() == 0  # unlooped sample ends (0.25 s at its own pitch)
    with pytest.raises(ValueError, match="no preset"):
        font.render(5, 60)
    (tmp_path / "bad.sf2").write_bytes(b"RIFF\0\0\0\0WAVE")
    with pytest.raises(ValueError, match="not a SoundFont"):
        SoundFont(tmp_path / "bad.sf2")


def test_gm_instruments_task_one_soundfont_per_split(tmp_path, monkeypatch):
    import bestrq2.eval.debian as D

    for split, (package, filename) in D.SOUNDFONTS.items():
        d = tmp_path / "root" / package
        d.mkdir(parents=True)
        write_sf2(d / filename, programs=(0, 1, 24, 25, 40, 41, 120))  # piano x2, guitar x2, strings x2, sfx
    monkeypatch.setattr(D, "fetch_package", lambda name, cache: tmp_path / "root" / name)
    task = read_manifest(D.build_gm_instruments(tmp_path, limit=2), domain="music")
    assert set(task.classes) == {"piano", "guitar", "strings"}  # sound effects left out, missing presets skipped
    assert {it["group"] for it in task.split("test")} == {"musescore-general-soundfont"}
    assert {it["group"] for it in task.split("train")} == {"fluid-soundfont-gm"}
    assert len(task.split("train")) == 6 * 3  # 6 programs x 3 keys


def test_hydrogen_drums_split_by_kit(tmp_path, monkeypatch):
    import bestrq2.eval.debian as D

    assert [D.drum_piece(n) for n in ["Kick (Tama 22\")", "Snare Rimshot", "Hi Hat Closed", "Floor Tom",
                                      "Side Stick", "ride-crash20inch", "Djembe1 Slap", "Closed HH"]] == \
        ["kick", "snare", "hihat", "tom", "rim", "crash", None, "hihat"]
    kits = tmp_path / "root" / "hydrogen-drumkits" / "drumkits"
    t = np.arange(3000) / 16000
    for k in range(8):
        kit = kits / f"kit{k}"
        kit.mkdir(parents=True)
        names = ["Kick", "Snare", "Closed HH", "Tom Low", "Djembe"] + (["Cowbell"] if k == 7 else [])
        xml = ['<drumkit_info xmlns="http://www.hydrogen-music.org/drumkit"><instrumentList>']
        for j, name in enumerate(names):
            sf.write(kit / f"{j}.wav", (0.3 * np.sin(2 * np.pi * (100 + 200 * j + 10 * k) * t)).astype(np.float32), 16000)
            xml.append(f"<instrument><name>{name}</name><layer><filename>{j}.wav</filename></layer></instrument>")
        (kit / "drumkit.xml").write_text("".join(xml) + "</instrumentList></drumkit_info>")
    monkeypatch.setattr(D, "fetch_package", lambda name, cache: tmp_path / "root" / name)
    m = D.build_hydrogen_drums(tmp_path)
    rows = list(csv.DictReader(open(m)))
    where = {}
    for r in rows:
        where.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in where.values()) and {r["split"] for r in rows} == {"train", "val", "test"}
    train = {r["label"] for r in rows if r["split"] == "train"}
    assert {r["label"] for r in rows} <= train and "djembe" not in {r["label"] for r in rows}
    read_manifest(m, domain="music")  # passes the manifest checks (no label only outside train)


def test_tts_digits_train_espeak_test_flite(tmp_path, monkeypatch):
    """The digits task with stand-in synthesisers (scripts that write a tone to the output path)."""
    import sys

    import bestrq2.eval.debian as D

    fake = tmp_path / "synth.py"
    # standard library only, run with -S: ~240 calls start in ~20 ms each instead of ~150 ms with numpy
    fake.write_text("import math, re, struct, sys, wave\n"
                    "a = sys.argv\n"
                    "if '-w' in a: out, text = a[a.index('-w') + 1], a[-1]\n"
                    "elif '-o' in a: out, text = a[a.index('-o') + 1], a[a.index('-t') + 1]\n"
                    "else: text, out = re.search(r'Text \"(\\w+)\"\\)\\) \"([^\"]+)\"', a[-1]).groups()\n"
                    "f = 100 + 30 * len(text)\n"
                    "w = wave.open(out, 'wb'); w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000)\n"
                    "w.writeframes(b''.join(struct.pack('<h', int(9830 * math.sin(2 * math.pi * f * i / 16000)))\n"
                    "                       for i in range(4000))); w.close()\n")
    for name in ("espeak", "flite", "festival"):
        exe = tmp_path / name
        exe.write_text(f"#!/bin/sh\nexec {sys.executable} -S -E {fake} \"$@\"\n")
        exe.chmod(0o755)
    monkeypatch.setattr(D, "_tts_env", lambda cache: ({"PATH": "/usr/bin:/bin"}, tmp_path / "espeak",
                                                       tmp_path / "flite", tmp_path, tmp_path / "festival"))
    task = read_manifest(D.build_tts_digits(tmp_path, limit=3), domain="speech")
    assert set(task.classes) == set(D.DIGITS)
    assert {it["group"].split(":")[0] for it in task.split("test")} == {"flite"}
    assert {it["group"].split(":")[0] for it in task.split("train") + task.split("val")} == {"espeak", "festival"}
    assert {it["group"] for it in task.split("train")} & {it["group"] for it in task.split("test")} == set()
    assert len(task.split("test")) == 3 * 3 * 10  # 3 voices x 3 rates x 10 digits
    assert sum(it["group"] == "festival:ked" for it in task.items) == 2 * 3 * 10  # 2 builds x 3 rates
    monkeypatch.setattr(D, "_tts_env", lambda cache: ({"PATH": "/bin"}, tmp_path / "nope", tmp_path / "nope", tmp_path,
                                                      tmp_path / "nope"))
    with pytest.raises((ValueError, OSError)):
        D.build_tts_digits(tmp_path / "other", limit=1)


def test_builtin_tts_digits_real_packages(tmp_path):
    """The real espeak-ng, Festival and flite, run from their unpacked Debian packages (about 35 MB): two
    voices each of espeak-ng and flite, Festival's ked in its 16 and 8 kHz builds; the clips are
    speech-length and non-silent."""
    import shutil

    import bestrq2.eval.debian as D

    if shutil.which("apt-get") is None:
        pytest.fail("the built-in tasks need a Debian-based machine (apt-get, dpkg-deb)")
    task = read_manifest(D.build_tts_digits(tmp_path, limit=2), domain="speech")
    assert len(task.items) == 2 * 3 * 10 * 2 + 2 * 3 * 10
    base = tmp_path / "tasks" / "tts_digits_2"
    festival = [it for it in task.items if it["group"] == "festival:ked"]
    assert len(festival) == 60 and all(it["split"] == "train" for it in festival)
    for it in task.items[::7] + festival[::13]:
        x, sr = sf.read(base / it["path"])
        assert 0.2 < len(x) / sr < 2.5 and np.abs(x).max() > 0.05
    meta = json.loads((tmp_path / "packages.json").read_text())
    assert meta["espeak-ng"]["version"] and meta["flite"]["version"] and meta["festival"]["version"]


def test_dig_priors_and_code_stats_on_known_codes():
    """eval/dig.py's context-free predictors: row r always holds code 3r (plus rare noise) -> the row prior
    puts nearly all mass on 3r, the pooled one spreads it over 8 codes (entropy ln 8)."""
    import math
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "eval"))
    import dig

    rows, w, k = 8, 16, 64
    codes = (3 * torch.arange(rows)).repeat_interleave(w).repeat(50, 1)  # [50 clips, 8 * 16 tokens]
    codes[0, 0] = 63  # one rare code in row 0
    lp_row, lp_pool = dig.row_prior(codes, rows, k)
    assert lp_row.shape == (rows, k) and lp_pool.shape == (k,)
    assert torch.equal(lp_row.argmax(1), 3 * torch.arange(rows))
    assert lp_row.exp().sum(1).sub(1).abs().max() < 1e-9 and abs(lp_pool.exp().sum() - 1) < 1e-9
    assert (lp_row[torch.arange(rows), 3 * torch.arange(rows)].exp() > 0.97).all()
    assert lp_row[1, 63] < lp_row[0, 63] < 0  # the rare code borrows mass in other rows, most in its own
    st = dig.code_stats(codes[1:])
    assert st["codes_used"] == 8 and st["top_share"] == pytest.approx(1 / 8)
    assert st["entropy_nats"] == pytest.approx(math.log(8)) and st["patches"] == 49 * rows * w


def test_dig_neighbour_model_reads_the_context():
    """Each clip repeats one code (of 4) along every row: a visible neighbour gives the masked code away
    (accuracy ~1), the context-free predictors stay at the 1-in-4 prior."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "eval"))
    import dig

    g = torch.Generator().manual_seed(0)
    rows, w, k = 8, 16, 32

    def clips(n):
        per_clip = torch.randint(0, 4, (n, rows, 1), generator=g) * 5 + torch.arange(rows)[None, :, None]
        return per_clip.expand(n, rows, w).reshape(n, rows * w).clone()

    mask = torch.zeros(rows * w, dtype=torch.bool)
    mask[torch.randperm(rows * w, generator=g)[:64]] = True
    res = dig.context_free_and_neighbour(clips(200), clips(20), mask, rows, k)
    assert res["neighbour"]["accuracy"] > 0.99 and res["neighbour"]["loss"] < 0.1
    assert 0.1 < res["row_unigram"]["accuracy"] < 0.45 and res["row_unigram"]["loss"] > 1.2
    assert set(res["neighbour_by_beta"]) == {"1", "5", "20", "100"}
