"""Evaluation pieces: probe and kNN on features with a known answer, group splits, manifests, and a
smoke run of `bestrq2 eval` on a small synthetic task."""
import csv
import json
import re

import numpy as np
import pytest
import soundfile as sf
import torch

from bestrq2 import BestRQ2Config, BestRQ2Encoder
from bestrq2.cli import main
from bestrq2.eval import (accuracy_ci, cv_folds, group_split, knn_classify, linear_probe, logistic_probe,
                          paired_difference, read_manifest, xares_probe)
from bestrq2.eval.probe import L2_GRID
from bestrq2.eval.suite import TaskScore, summarize


def clusters(n_per, dim=16, classes=3, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 3
    x = torch.cat([centers[c] + spread * torch.randn(n_per, dim, generator=g) for c in range(classes)])
    return x, torch.arange(classes).repeat_interleave(n_per)


def _split(x, y, seed=0):
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n = x.shape[0]
    a, b = int(0.6 * n), int(0.75 * n)
    return (x[idx[:a]], y[idx[:a]]), (x[idx[a:b]], y[idx[a:b]]), (x[idx[b:]], y[idx[b:]])


def test_logistic_probe_converges_and_needs_no_seed():
    """Separable clusters: 100% on test; the fit is a convex optimum, so it is the same whatever the torch
    seed, and its gradient at the end is ~0 (converged, not stopped by an epoch count)."""
    from bestrq2.eval.probe import fit_logistic, standardize

    tr, va, te = _split(*clusters(70, seed=1))
    torch.manual_seed(0)
    a = logistic_probe(tr, va, te, 3)
    torch.manual_seed(123)
    b = logistic_probe(tr, va, te, 3)
    assert a.test_accuracy == 1.0 and a.val_accuracy == 1.0
    assert torch.equal(a.predictions, b.predictions) and a.l2 == b.l2 and a.l2 in L2_GRID
    xs = standardize(tr[0])[0]
    w, bias = fit_logistic(xs, tr[1], 3, 1e-2)
    w.requires_grad_(), bias.requires_grad_()
    loss = torch.nn.functional.cross_entropy(xs @ w + bias, tr[1]) + 0.5e-2 * (w * w).sum()
    gw, gb = torch.autograd.grad(loss, (w, bias))
    assert max(float(gw.abs().max()), float(gb.abs().max())) < 1e-6


def test_logistic_probe_beats_the_old_under_trained_probe_on_scaled_features():
    """Features on wildly different scales (as log-mel statistics are): standardisation + a converged fit
    find the signal that 100 epochs of Adam at 1e-3 on raw features miss."""
    g = torch.Generator().manual_seed(3)
    n, d = 300, 20
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, d, generator=g)
    x[:, 0] += 1.5 * y  # the signal sits in a small-scale column
    x[:, 0] *= 0.01
    x[:, 1:] *= 100.0  # nuisance columns, large scale
    tr, va, te = _split(x, y)
    assert logistic_probe(tr, va, te, 3).test_accuracy >= linear_probe(tr, va, te, 3, epochs=100).test_accuracy + 0.1


def test_probes_are_at_chance_on_random_labels():
    x = torch.randn(300, 16)
    y = torch.randint(0, 4, (300,))
    tr, va, te = (x[:200], y[:200]), (x[200:250], y[200:250]), (x[250:], y[250:])
    assert logistic_probe(tr, va, te, 4).test_accuracy < 0.5  # chance is 0.25
    assert xares_probe(tr, va, te, 4, epochs=30, patience=5).test_accuracy < 0.5
    assert knn_classify(tr, te, 4).test_accuracy < 0.5


def test_xares_probe_stops_early_on_val():
    tr, va, te = _split(*clusters(70, seed=2))
    res = xares_probe(tr, va, te, 3, epochs=1000, patience=10)
    assert res.test_accuracy >= 0.95 and res.best_epoch < 990  # stopped long before the budget


def test_knn_is_standardised_and_errors():
    tr = (torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]]), torch.tensor([0, 1, 0]))
    te = (torch.tensor([[0.0, 2.0], [3.0, 0.2]]), torch.tensor([1, 0]))
    assert knn_classify(tr, te, 2, k=1).test_accuracy == 1.0
    # a huge constant offset on one feature would dominate raw cosines; standardised it does not
    off = torch.tensor([0.0, 1000.0])
    assert knn_classify((tr[0] + off, tr[1]), (te[0] + off, te[1]), 2, k=1).test_accuracy == 1.0
    with pytest.raises(ValueError, match="NaN"):
        knn_classify(tr, (torch.tensor([[float("nan"), 0.0]]), torch.tensor([0])), 2)
    with pytest.raises(ValueError, match="labels"):
        logistic_probe(tr, tr, (tr[0], tr[1][:2]), 2)


def test_bootstrap_intervals_cover_the_truth_at_the_nominal_rate():
    """200 synthetic test sets of 150 clips with true accuracy 0.7: the 95% interval holds 0.7 in about
    95% of them (binomial noise over 200 draws: 89-99% is a pass); a paired difference of two scorers
    with true difference 0.1 is covered likewise."""
    g = torch.Generator().manual_seed(0)
    covered, covered_diff = 0, 0
    for i in range(200):
        hits = (torch.rand(150, generator=g) < 0.7).float()
        _, lo, hi = accuracy_ci([hits], n_boot=500, seed=i)
        covered += lo <= 0.7 <= hi
        easy = torch.rand(150, generator=g)
        a = (easy < 0.8).float()  # a shares b's easy clips and gets 0.1 more right
        b = (easy < 0.7).float()
        d, dlo, dhi = paired_difference([a], [b], n_boot=500, seed=i)
        covered_diff += dlo <= 0.1 <= dhi
    assert 0.89 <= covered / 200 <= 0.99, covered
    assert 0.89 <= covered_diff / 200 <= 1.0, covered_diff
    acc, lo, hi = accuracy_ci([torch.ones(50), torch.zeros(150)], n_boot=500)  # two tasks, weighted by size
    assert acc == lo == hi == 0.25  # constant hits: no sampling spread
    acc, lo, hi = accuracy_ci([torch.ones(50), (torch.arange(150) % 2).float()], n_boot=500)
    assert acc == (50 + 75) / 200 and lo < acc < hi


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
    with pytest.raises(ValueError, match="split or group"):
        read_manifest(write_manifest(tmp_path / "u.csv", [{"path": "a", "label": "x", "speaker": "s"}],
                                     ["path", "label", "speaker"]))
    rows = [{"path": "a", "label": "x", "split": "train"}, {"path": "b", "label": "x", "split": "val"},
            {"path": "c", "label": "z", "split": "test"}]
    with pytest.raises(ValueError, match="only outside train"):
        read_manifest(write_manifest(tmp_path / "t.csv", rows, ["path", "label", "split"]))
    rows[2]["split"] = "holdout"
    with pytest.raises(ValueError, match="line 4: split 'holdout'"):
        read_manifest(write_manifest(tmp_path / "d.csv", rows, ["path", "label", "split"]))
    for blank in ("", "   "):
        with pytest.raises(ValueError, match="line 2: blank label"):
            read_manifest(write_manifest(tmp_path / "e.csv", [{"path": "a", "label": blank, "split": "train"}],
                                         ["path", "label", "split"]))
    with pytest.raises(ValueError, match="not found"):
        read_manifest(tmp_path / "missing.csv")
    two = [{"path": "a", "label": "x", "split": "train", "domain": "speech"},
           {"path": "b", "label": "x", "split": "val", "domain": "music"},
           {"path": "c", "label": "x", "split": "test", "domain": "music"}]
    with pytest.raises(ValueError, match="one domain"):
        read_manifest(write_manifest(tmp_path / "dd.csv", two, ["path", "label", "split", "domain"]))


def test_manifests_as_people_write_them(tmp_path):
    """Extra columns ignored and listed; split aliases; labels stripped; the domain from a column, from
    task.json or given; the task named after its folder when the file is manifest.csv."""
    rows = [{"path": f"{i}.wav", "label": f" {'ab'[i % 2]} ", "split": sp, "source": "x", "duration_s": "1.0",
             "domain": "speech"} for i, sp in enumerate(["train", "TRAIN", "valid", "Validation", "dev", "test", "test"])]
    d = tmp_path / "my_task"
    d.mkdir()
    task = read_manifest(write_manifest(d / "manifest.csv", rows, list(rows[0])))
    assert task.name == "my_task" and task.domain == "speech"
    assert task.ignored_columns == ["duration_s", "source"]
    assert [it["split"] for it in task.items] == ["train", "train", "val", "val", "val", "test", "test"]
    assert task.classes == ["a", "b"]
    assert read_manifest(d / "manifest.csv", domain="music").domain == "music"  # given wins
    for r in rows:
        del r["domain"]
    write_manifest(d / "manifest.csv", rows, list(rows[0]))
    (d / "task.json").write_text(json.dumps({"name": "digits", "domain": "environment"}))
    task = read_manifest(d / "manifest.csv")
    assert (task.name, task.domain) == ("digits", "environment")
    (d / "task.json").unlink()
    assert read_manifest(write_manifest(tmp_path / "other.csv", rows, list(rows[0]))).name == "other"
    assert read_manifest(tmp_path / "other.csv").domain == "custom"


def test_cv_folds_test_every_item_once_and_keep_groups_whole():
    items = [{"group": f"g{i % 7}"} for i in range(40)]
    for k in (3, 5, "groups"):
        folds = cv_folds(items, k, seed=1)
        assert len(folds) == (7 if k == "groups" else k)
        tested = sorted(j for _, _, te in folds for j in te)
        assert tested == list(range(40))
        for tr, va, te in folds:
            assert not (set(tr) & set(va)) and not (set(tr) & set(te)) and not (set(va) & set(te))
            assert sorted(tr + va + te) == list(range(40))
            for part in (tr, va, te):  # whole groups only
                gs = {items[j]["group"] for j in part}
                assert all(items[j]["group"] in gs for j in range(40) if items[j]["group"] in gs and j in part)
            assert not ({items[j]["group"] for j in tr} & {items[j]["group"] for j in te})
    with pytest.raises(ValueError, match="K >= 3"):
        cv_folds(items, 2)
    with pytest.raises(ValueError, match="only 7 groups"):
        cv_folds(items, 8)


def test_summary_weights_by_test_size():
    rs = [TaskScore("a", "speech", 10, {"m/probe": 1.0}), TaskScore("b", "music", 30, {"m/probe": 0.5})]
    s = summarize(rs)
    assert s["overall"]["m/probe"] == pytest.approx((10 * 1.0 + 30 * 0.5) / 40)
    assert s["speech"]["m/probe"] == 1.0 and s["music"]["m/probe"] == 0.5


def _tone_noise_task(d, groups=6, per=4, extra_cols=()):
    rng = np.random.default_rng(0)
    rows = []
    d.mkdir(parents=True, exist_ok=True)
    for g in range(groups):
        for j in range(per):
            n = 8000 if j == 0 else 16000  # one clip per group under 1 s: padded to 1 s
            t = np.arange(n) / 16000
            tone = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t)
            noise = 0.3 * rng.standard_normal(n)
            for label, x in (("tone", tone), ("noise", noise)):
                p = d / f"{label}{g}_{j}.wav"
                sf.write(p, x.astype(np.float32), 16000)
                rows.append({"path": p.name, "label": label, "group": f"rec{g}", **{c: "x" for c in extra_cols}})
    return rows


def test_eval_cli_smoke(tmp_path, capsys, monkeypatch):
    """Tones vs noise bursts, 6 recording groups, two manifests with their own domains; short clips padded
    and counted, an unreadable and a missing file skipped and named; intervals in the report; rounded JSON;
    --batch-size reaches every encoder's feature pass."""
    import bestrq2.eval.suite as S

    rows = _tone_noise_task(tmp_path / "a", extra_cols=("source",))
    (tmp_path / "a" / "bad.wav").write_bytes(b"junk")
    rows += [{"path": "bad.wav", "label": "tone", "group": "rec0", "source": "x"},
             {"path": "gone.wav", "label": "noise", "group": "rec1", "source": "x"}]
    man_a = write_manifest(tmp_path / "a" / "manifest.csv", rows, ["path", "label", "group", "source"])
    man_b = write_manifest(tmp_path / "b.csv", [dict(r, path=str(tmp_path / "a" / r["path"])) for r in rows[:48]],
                           ["path", "label", "group", "source"])
    enc = BestRQ2Encoder(BestRQ2Config.preset("tiny", encoder_depth=1))
    enc.save_pretrained(tmp_path / "enc")
    out = tmp_path / "report.md"
    assert main(["eval", "--model", str(tmp_path / "enc"), "--manifest", str(man_a), "--domain", "environment",
                 "--manifest", str(man_b), "--domain", "music", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "task a: ignoring columns source" in text
    assert "task a: 12 clips under 1 s padded to 1 s, 2 files skipped" in text
    assert "logmel_stats/probe" in text and "random_init/knn" in text and "**environment**" in text
    assert "**music**" in text and "Paired difference model − random_init" in text
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["summary"]["overall"]["logmel_stats/probe"] >= 0.9  # tones vs noise: easy from log-mel stats
    task_a = report["tasks"][0]
    assert task_a["padded"] == 12 and task_a["skipped"] == 2
    assert task_a["skipped_files"][str(tmp_path / "a" / "gone.wav")] == "file not found"
    lo, hi = task_a["ci"]["logmel_stats/probe"]
    assert lo <= task_a["scores"]["logmel_stats/probe"] <= hi
    assert "[" in out.read_text()  # intervals in the markdown
    floats = re.findall(r"\d+\.\d+", out.with_suffix(".json").read_text())
    assert floats and all(len(f.split(".")[1]) <= 4 for f in floats)  # rounded, no float32 noise
    # K-fold over groups, 3 clips a batch
    batch_sizes, features = [], S.clip_features
    monkeypatch.setattr(S, "clip_features", lambda *a, **k: batch_sizes.append(k.get("batch_size")) or features(*a, **k))
    assert main(["eval", "--model", str(tmp_path / "enc"), "--manifest", str(man_b), "--cv", "3",
                 "--no-progress", "--out", str(tmp_path / "cv.md"), "--batch-size", "3"]) == 0
    assert batch_sizes == [3] * 3  # model, random_init, logmel_stats
    cv = json.loads((tmp_path / "cv.json").read_text())
    assert cv["tasks"][0]["folds"] == 3 and cv["tasks"][0]["n_test"] == 48  # every clip tested once


def test_a_bad_manifest_fails_before_any_audio_is_encoded(tmp_path, capsys, monkeypatch):
    import bestrq2.eval.suite as S

    rows = _tone_noise_task(tmp_path / "a", groups=3, per=2)
    good = write_manifest(tmp_path / "a" / "manifest.csv", rows, ["path", "label", "group"])
    bad = write_manifest(tmp_path / "bad.csv", [{"path": "x.wav", "label": " ", "group": "g"}], ["path", "label", "group"])
    BestRQ2Encoder(BestRQ2Config.preset("tiny", encoder_depth=1)).save_pretrained(tmp_path / "enc")
    encoded = []
    monkeypatch.setattr(S, "clip_features", lambda *a, **k: encoded.append(1))
    assert main(["eval", "--model", str(tmp_path / "enc"), "--manifest", str(good), "--manifest", str(bad),
                 "--no-progress"]) == 2
    assert "blank label" in capsys.readouterr().err and not encoded
    assert main(["eval", "--model", str(tmp_path / "enc"), "--manifest", str(good), "--manifest", str(good),
                 "--domain", "a", "--domain", "b", "--domain", "c", "--no-progress"]) == 2
    assert "one for every --manifest" in capsys.readouterr().err and not encoded


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
    assert "| ufoai_sfx | environment |" in text and "logmel_stats/probe" in text


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
    """The dig's context-free predictors (bestrq2.eval.code_prior): row r always holds code 3r (plus rare
    noise) -> the row prior puts nearly all mass on 3r, the pooled one spreads it over 8 codes (entropy ln 8)."""
    import math

    from bestrq2.codes import usage
    from bestrq2.eval.code_prior import row_prior

    rows, w, k = 8, 16, 64
    codes = (3 * torch.arange(rows)).repeat_interleave(w).repeat(50, 1)  # [50 clips, 8 * 16 tokens]
    codes[0, 0] = 63  # one rare code in row 0
    lp_row, lp_pool = row_prior(codes, rows, k)
    assert lp_row.shape == (rows, k) and lp_pool.shape == (k,)
    assert torch.equal(lp_row.argmax(1), 3 * torch.arange(rows))
    assert lp_row.exp().sum(1).sub(1).abs().max() < 1e-9 and abs(lp_pool.exp().sum() - 1) < 1e-9
    assert (lp_row[torch.arange(rows), 3 * torch.arange(rows)].exp() > 0.97).all()
    assert lp_row[1, 63] < lp_row[0, 63] < 0  # the rare code borrows mass in other rows, most in its own
    st = usage(codes[1:], k)
    assert st["codes_used"] == 8 and st["top_share"] == pytest.approx(1 / 8)
    assert st["entropy_nats"] == pytest.approx(math.log(8)) and st["patches"] == 49 * rows * w


def test_dig_neighbour_model_reads_the_context():
    """Each clip repeats one code (of 4) along every row: a visible neighbour gives the masked code away
    (accuracy ~1), the context-free predictors stay at the 1-in-4 prior."""
    from bestrq2.eval.code_prior import context_free_and_neighbour

    g = torch.Generator().manual_seed(0)
    rows, w, k = 8, 16, 32

    def clips(n):
        per_clip = torch.randint(0, 4, (n, rows, 1), generator=g) * 5 + torch.arange(rows)[None, :, None]
        return per_clip.expand(n, rows, w).reshape(n, rows * w).clone()

    mask = torch.zeros(rows * w, dtype=torch.bool)
    mask[torch.randperm(rows * w, generator=g)[:64]] = True
    res = context_free_and_neighbour(clips(200), clips(20), mask, rows, k)
    assert res["neighbour"]["accuracy"] > 0.99 and res["neighbour"]["loss"] < 0.1
    assert 0.1 < res["row_unigram"]["accuracy"] < 0.45 and res["row_unigram"]["loss"] > 1.2
    assert set(res["neighbour_by_beta"]) == {"1", "5", "20", "100"}


def test_retest_merges_a_later_norm_into_a_seed_cache():
    """experiments/retest.py scores only the encoders a seed's cache lacks and merges them in: every
    per-encoder field and summary scope gains the new keys, the old ones stay; mismatched tasks refuse."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("retest", Path(__file__).parents[1] / "experiments" / "retest.py")
    retest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(retest)

    def cache(enc, acc, n_test=4):
        task = {"task": "t", "domain": "music", "n_test": n_test, "scores": {f"{enc}/probe": acc},
                "hits": {f"{enc}/probe": [1, 0, 1, 0]}, "l2": {enc: 1.0}, "probe": "logistic"}
        return {"tasks": [task], "summary": {"overall": {f"{enc}/probe": acc}, "music": {f"{enc}/probe": acc}}}

    merged = retest.merge_scores(cache("a", 0.5), cache("b", 0.75))
    t = merged["tasks"][0]
    assert t["scores"] == {"a/probe": 0.5, "b/probe": 0.75} and set(t["hits"]) == {"a/probe", "b/probe"}
    assert t["l2"] == {"a": 1.0, "b": 1.0} and t["probe"] == "logistic"
    assert merged["summary"]["overall"] == {"a/probe": 0.5, "b/probe": 0.75}
    with pytest.raises(ValueError, match="test clips"):
        retest.merge_scores(cache("a", 0.5), cache("b", 0.75, n_test=5))
