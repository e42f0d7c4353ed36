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
