"""The main job end to end at a tiny size: procedural corpus, pretraining, resume, embedding."""
import csv
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from bestrq2.cli import main
from bestrq2.data import AudioFolder, SyntheticCorpus
from bestrq2.data.synthetic import synth_clip
from bestrq2.train import TrainConfig, lr_factor, pretrain


def test_synthetic_corpus_deterministic_and_varied():
    a, b = synth_clip(0, 5, 2.0), synth_clip(0, 5, 2.0)
    assert np.array_equal(a, b) and a.dtype == np.float32 and a.shape == (32_000,)
    assert not np.array_equal(a, synth_clip(0, 6, 2.0)) and not np.array_equal(a, synth_clip(1, 5, 2.0))
    assert 0.2 < np.abs(a).max() <= 0.9 and np.isfinite(a).all()
    wave, n = SyntheticCorpus(seed=3, seconds=1.0)[2]
    assert wave.shape == (16_000,) and n == 16_000


def test_lr_schedule():
    f = [lr_factor(s, 100, 0.05, 1e-3) for s in range(100)]
    assert f[0] == pytest.approx(0.2) and f[4] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(f[4:], f[5:])) and f[-1] == pytest.approx(1e-3, abs=2e-3)


def test_pretrain_writes_metrics_checkpoint_and_encoder(tmp_path):
    tc = TrainConfig(preset="tiny", steps=3, batch_size=2, seconds=1.0, out=str(tmp_path / "a"), ckpt_every=2,
                     num_workers=0, progress=False, lr=1e-3)
    res = pretrain(tc)
    assert len(res["losses"]) == 3 and all(np.isfinite(res["losses"]))
    rows = list(csv.DictReader(open(tmp_path / "a" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert (tmp_path / "a" / "encoder" / "model.safetensors").is_file()
    ckpts = sorted((tmp_path / "a" / "checkpoints").glob("ckpt-*.pt"))
    assert [c.name for c in ckpts] == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    assert torch.load(ckpts[-1], weights_only=True)["step"] == 3


def test_cli_main_job(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--steps", "3", "--batch-size", "2", "--seconds", "1", "--out", str(out),
                 "--num-workers", "0", "--no-progress"]) == 0
    wav = tmp_path / "x.wav"
    assert main(["synth", str(wav), "--seconds", "12.5"]) == 0
    assert main(["embed", str(wav), "--model", str(out / "encoder"), "--out", str(tmp_path / "e.npy")]) == 0
    frames = np.load(tmp_path / "e.npy")
    assert frames.shape == (16 + 4, 192) and np.isfinite(frames).all()  # 10 s -> 16 frames, 2.5 s -> 4
    text = capsys.readouterr().out
    assert "frames x 192 dims" in text


def test_cli_errors_name_the_problem(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # pretrain's default --out (runs/demo) must not find a run left in the checkout
    assert main(["embed", str(tmp_path / "missing.wav"), "--model", str(tmp_path)]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "x.wav"), "--seconds", "1"]) == 0
    assert main(["embed", str(tmp_path / "x.wav"), "--model", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["embed", str(tmp_path), "--model", str(tmp_path)]) == 2  # a folder needs somewhere to write
    assert "--out-dir" in capsys.readouterr().err
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    (tmp_path / "m").mkdir()
    with pytest.raises(SystemExit):
        main(["pretrain", "--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(tmp_path / "nodir"), "--steps", "1", "--no-progress"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_audio_folder_reads_resamples_and_skips(tmp_path):
    sf.write(tmp_path / "a.wav", np.random.default_rng(0).standard_normal((22_050, 2)).astype(np.float32) * 0.1, 44_100)
    (tmp_path / "sub").mkdir()
    sf.write(tmp_path / "sub" / "b.flac", (np.random.default_rng(1).standard_normal(40_000) * 0.1).astype(np.float32), 16_000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....garbage")
    ds = AudioFolder(tmp_path, seconds=1.0)
    assert len(ds.files) == 3
    items = [ds[i] for i in range(3)]
    assert all(w.shape == (16_000,) for w, _ in items)
    lengths = sorted(n for _, n in items)
    # 0.5 s at 44.1 kHz -> 8 000 samples at 16 kHz, zero-padded; under one patch, so counted as one patch
    assert lengths[0] == 9_375
    short = next(w for w, n in items if n == 9_375)
    assert float(short[7_990:8_000].abs().max()) > 0 and float(short[8_000:].abs().max()) == 0
    assert any("broken.wav" in k for k in ds.skipped)


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "bestrq2", "pretrain", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--preset" in out.stdout
