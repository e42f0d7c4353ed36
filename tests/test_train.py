"""The pretraining pipeline: prepared shards, exact resume, crash safety, bad data, NaN losses,
gradient accumulation, export, and multi-process (gloo) training against one process."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from bestrq2 import BestRQ2, BestRQ2Config, BestRQ2Encoder
from bestrq2.cli import main
from bestrq2.data.shards import ShardedCorpus, prepare
from bestrq2.checkpoints import export_encoder, latest_checkpoint, list_checkpoints
from bestrq2.train import TrainConfig, pretrain

ROOT = Path(__file__).parent.parent


def tc(out, **kw):
    base = dict(preset="tiny", steps=4, batch_size=2, seconds=1.0, out=str(out), ckpt_every=100, num_workers=0,
                progress=False, lr=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def losses_of(run: Path) -> list[float]:
    return [float(r["loss"]) for r in csv.DictReader(open(run / "metrics.csv"))]


@pytest.fixture
def audio_dir(tmp_path):
    d = tmp_path / "audio"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sf.write(d / "a.wav", (rng.standard_normal(40_000) * 0.1).astype(np.float32), 16_000)
    sf.write(d / "sub" / "b.flac", (rng.standard_normal((30_000, 2)) * 0.1).astype(np.float32), 22_050)
    sf.write(d / "c.ogg", (rng.standard_normal(12_000) * 0.1).astype(np.float32), 16_000)
    (d / "broken.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage")
    (d / "text.flac").write_text("not audio")
    full = d / "trunc.wav"
    sf.write(full, (rng.standard_normal(20_000) * 0.1).astype(np.float32), 16_000)
    full.write_bytes(full.read_bytes()[:30])  # header only
    return d


def test_prepare_shards_and_stream(tmp_path, audio_dir):
    res = prepare(audio_dir, tmp_path / "prep", workers=2, shard_mb=1, progress=False)
    assert res["clips"] == 3 and len(res["skipped"]) == 3
    assert {Path(p).name for p in res["skipped"]} == {"broken.wav", "text.flac", "trunc.wav"}
    index = json.loads((tmp_path / "prep" / "index.json").read_text())
    lengths = sorted(e["length"] for e in index["clips"])
    assert lengths == sorted([40_000, 12_000, int(round(30_000 * 16_000 / 22_050))])
    ds = ShardedCorpus(tmp_path / "prep", seconds=1.0, seed=3)
    w, n = ds[0]
    assert w.shape == (16_000,) and n == 16_000
    e = index["clips"][0]
    src = sf.read(audio_dir / e["source"], dtype="float32")[0]
    start = int(np.random.default_rng([3, 0]).integers(0, e["length"] - 16_000 + 1))
    np.testing.assert_allclose(w.numpy(), src[start: start + 16_000], atol=1 / 32768 + 1e-6)  # int16 storage
    short = [i for i, e in enumerate(index["clips"]) if e["length"] == 12_000][0]
    w, n = ds[short]
    assert n == 12_000 and float(w[12_000:].abs().max()) == 0.0
    with pytest.raises(ValueError, match="already holds"):
        prepare(audio_dir, tmp_path / "prep", progress=False)
    res = pretrain(tc(tmp_path / "run", data=str(tmp_path / "prep"), steps=2))
    assert len(res["losses"]) == 2


def test_write_shards_from_memory(tmp_path):
    """Shards written from float arrays (no decoder: what the GPU benchmark's variant (e) uses) read back as
    the clips, to int16 precision, across shard boundaries; an existing corpus is not overwritten."""
    from bestrq2.data.shards import write_shards

    rng = np.random.default_rng(1)
    clips = [np.clip(rng.standard_normal(n) * 0.3, -1, 1).astype(np.float32) for n in (20_000, 12_000, 31_000)]
    clips[0][:2] = (1.0, -1.0)  # full scale both ways
    root = write_shards(((f"c{i}", c) for i, c in enumerate(clips)), tmp_path / "s", shard_mb=0.05)
    index = json.loads((root / "index.json").read_text())
    assert [e["length"] for e in index["clips"]] == [20_000, 12_000, 31_000]
    assert len({e["shard"] for e in index["clips"]}) == 3  # 0.05 MB shards: one clip each
    ds = ShardedCorpus(root, seconds=2.0, seed=0)
    for i, c in enumerate(clips):
        w, n = ds[i]
        e = index["clips"][i]
        start = int(np.random.default_rng([0, i]).integers(0, e["length"] - 32_000 + 1)) if e["length"] > 32_000 else 0
        take = min(32_000, len(c))
        assert n == take
        np.testing.assert_allclose(w[:take].numpy(), c[start: start + take], atol=1.5 / 32767)  # stored x 32767, read / 32768
        assert not w[take:].any()
    with pytest.raises(ValueError, match="already holds"):
        write_shards([("x", clips[1])], root)
    with pytest.raises(ValueError, match="no clips"):
        write_shards([], tmp_path / "empty")


def test_shard_batches_travel_as_int16_and_train_bit_for_bit(tmp_path):
    """From prepared shards a step's batch is int16 PCM (half the bytes to pin and copy), scaled on the device
    to exactly the float32 samples of the float path: the same batch, the same loss to the bit, with and
    without loader workers (whose batches are built in shared memory)."""
    from bestrq2.data.shards import write_shards
    from bestrq2.train import StepBatches

    rng = np.random.default_rng(2)
    clips = [np.clip(rng.standard_normal(n) * 0.2, -1, 1).astype(np.float32) for n in (25_000, 12_000, 9_000, 17_000)]
    root = write_shards(((f"c{i}", c) for i, c in enumerate(clips)), tmp_path / "s")
    ds = ShardedCorpus(root, seconds=1.0, seed=5)
    pcm, lens16 = StepBatches(ds, 4, 0, 4)[3]
    ref, lens32 = StepBatches(ds, 4, 0, 4, pcm16=False)[3]
    assert pcm.dtype == torch.int16 and ref.dtype == torch.float32 and torch.equal(lens16, lens32)
    assert lens16.tolist()[2] == 9_375  # the clip under one patch counts as one patch
    torch.manual_seed(0)
    model = BestRQ2(BestRQ2Config.preset("tiny"))
    mask = torch.rand(4, model.config.freq_patches).argsort(-1) < 3  # 1 s: one patch column
    a, b = model.prepare(pcm, lens16, mask), model.prepare(ref, lens32, mask)
    assert a.wave.dtype == torch.float32 and torch.equal(a.wave, b.wave)
    loss = []
    for batch in (a, b):
        torch.manual_seed(1)  # the same drop-path draws
        loss.append(model.forward_batch(batch).loss)
    assert torch.equal(*loss)
    with pytest.raises(ValueError, match="integer PCM"):
        model(pcm.to(torch.int32), lens16)  # only int16 is taken as PCM
    losses = {}
    for workers in (0, 2):
        run = tmp_path / f"run{workers}"
        pretrain(tc(run, data=str(root), steps=3, batch_size=4, num_workers=workers))
        losses[workers] = losses_of(run)
    assert losses[0] == losses[2] and len(losses[0]) == 3


def test_worker_batches_are_built_in_shared_memory():
    from bestrq2.train import _batch_tensor

    class Probe(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.tensor(_batch_tensor((3, 5), torch.int16).is_shared())

    assert not _batch_tensor((3, 5), torch.int16).is_shared()  # in the main process: plain memory
    assert all(bool(x) for x in torch.utils.data.DataLoader(Probe(), batch_size=None, num_workers=1))


def test_clips_shorter_than_one_patch_train(tmp_path):
    """Real corpora hold clicks and short effects (the Debian corpus: under 0.586 s): a prepared corpus or a
    folder with such a clip trains, the clip counted as one patch of audio and zeros."""
    from bestrq2.config import MIN_SAMPLES
    from bestrq2.data.folder import AudioFolder

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    sf.write(src / "click.wav", (rng.standard_normal(3_000) * 0.1).astype(np.float32), 16_000)
    sf.write(src / "long.wav", (rng.standard_normal(20_000) * 0.1).astype(np.float32), 16_000)
    prepare(src, tmp_path / "prep", progress=False)
    for ds in (ShardedCorpus(tmp_path / "prep", seconds=1.0), AudioFolder(src, seconds=1.0)):
        lengths = sorted(ds[i][1] for i in range(2))
        assert lengths == [MIN_SAMPLES, 16_000]
    res = pretrain(tc(tmp_path / "run", data=str(tmp_path / "prep"), steps=2))
    assert len(res["losses"]) == 2 and all(np.isfinite(res["losses"]))


def test_opus_files_are_read(tmp_path):
    """Ogg/Opus (warzone2100-music of the Debian corpus ships it) is found and decoded at 16 kHz."""
    from bestrq2.data.folder import EXTENSIONS, load_audio

    t = np.arange(48_000) / 48_000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sf.write(tmp_path / "a.opus", tone, 48_000, format="OGG", subtype="OPUS")
    assert ".opus" in EXTENSIONS
    x = load_audio(tmp_path / "a.opus")
    assert abs(len(x) - 16_000) <= 400  # 1 s (the codec's pre-skip may trim a few ms)
    spectrum = np.abs(np.fft.rfft(x[2000:14000]))
    assert abs(np.argmax(spectrum) * 16_000 / 12_000 - 440) < 5  # the tone survived


def test_corrupt_files_are_skipped_counted_and_named(tmp_path, audio_dir):
    res = pretrain(tc(tmp_path / "run", data=str(audio_dir), steps=4, batch_size=3))
    assert len(res["losses"]) == 4 and all(np.isfinite(res["losses"]))
    assert {Path(p).name for p in res["skipped_files"]} == {"broken.wav", "text.flac", "trunc.wav"}
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert int(rows[-1]["skipped_files"]) == 3


def test_exact_resume_and_keep_last(tmp_path):
    full = pretrain(tc(tmp_path / "a", steps=6, ckpt_every=1, keep=2))["losses"]
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == ["ckpt-00000005.pt", "ckpt-00000006.pt"]
    first = pretrain(tc(tmp_path / "b", steps=6), stop_after=2)["losses"]
    with open(tmp_path / "b" / "metrics.csv", "a") as f:  # a crash logged steps 3-4 after the step-2 checkpoint
        f.write("3,9.9,0,0,0,nan,0,0\n4,9.9,0,0,0,nan,0,0\n")
    second = pretrain(tc(tmp_path / "b", steps=6), resume=True, stop_after=2)["losses"]
    third = pretrain(tc(tmp_path / "b", steps=6), resume=True)["losses"]
    assert first + second + third == full  # bit for bit
    assert losses_of(tmp_path / "b") == [float(f"{x:.6f}") for x in full]
    assert (tmp_path / "b" / "loss.png").is_file()


def test_a_run_is_never_overwritten_by_accident(tmp_path, capsys):
    run = tmp_path / "run"
    first = pretrain(tc(run, steps=2, ckpt_every=1))["losses"]
    before = (run / "metrics.csv").read_text()
    with pytest.raises(ValueError, match="already holds a run .*--resume.*--overwrite"):
        pretrain(tc(run, steps=2))
    assert (run / "metrics.csv").read_text() == before and len(list_checkpoints(run)) == 2  # untouched
    # the CLI says the same and exits 2; contradictory flags are refused by name
    cli = ["pretrain", "--steps", "2", "--batch-size", "2", "--seconds", "1", "--num-workers", "0", "--no-progress"]
    assert main([*cli, "--out", str(run)]) == 2 and "already holds a run" in capsys.readouterr().err
    assert main([*cli, "--resume", str(run), "--overwrite"]) == 2 and "give one of them" in capsys.readouterr().err
    assert main([*cli, "--out", str(run), "--extend"]) == 2 and "--resume" in capsys.readouterr().err
    # --overwrite moves the old run aside whole (renamed, nothing deleted) and starts afresh
    second = pretrain(tc(run, steps=3, overwrite=True))["losses"]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "metrics.csv").read_text() == before
    assert len(list_checkpoints(aside[0])) == 2 and (aside[0] / "encoder" / "model.safetensors").is_file()
    assert len(second) == 3 and second[:2] == first and len(losses_of(run)) == 3
    pretrain(tc(run, steps=1, overwrite=True))  # a second move aside in the same second gets its own name
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]) == 2
    # an empty folder, or one holding other files, is not a run
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    assert len(pretrain(tc(tmp_path / "empty", steps=1))["losses"]) == 1


def test_lr_schedule_extension_rule():
    from bestrq2.train import LRSchedule

    old = LRSchedule.fresh(100, 0.1, 1e-3)
    assert old.warmup == 10 and old(9) == 1.0 and old(10) == 1.0 and old(100) == pytest.approx(1e-3)
    ext = old.extended(60, 300)
    assert ext(60) == old(60)  # no jump where the run stands
    assert all(ext(s) >= ext(s + 1) for s in range(60, 300)) and ext(300) == pytest.approx(1e-3)
    assert max(abs(ext(s + 1) - ext(s)) for s in range(60, 300)) < max(abs(old(s + 1) - old(s)) for s in range(10, 100))
    early = old.extended(5, 300)  # during warm-up: the warm-up as it was, then the cosine over 300
    assert [early(s) for s in range(10)] == [old(s) for s in range(10)] and early == LRSchedule.fresh(300, 10 / 300, 1e-3)
    shorter = old.extended(60, 80)  # shortening works the same way
    assert shorter(60) == old(60) and shorter(80) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="already done 60 steps"):
        old.extended(60, 60)


def test_resume_with_another_length_needs_extend_and_keeps_the_lr_continuous(tmp_path):
    run = tmp_path / "run"
    pretrain(tc(run, steps=10, warmup_pct=0.2), stop_after=6)
    with pytest.raises(ValueError, match="run of 10 steps and --steps is 20.*--extend"):
        pretrain(tc(run, steps=20, warmup_pct=0.2), resume=True)
    pretrain(tc(run, steps=20, warmup_pct=0.2, extend=True), resume=True, stop_after=4)  # 6 -> 10
    pretrain(tc(run, steps=20, warmup_pct=0.2), resume=True)  # the extended length is the run's own now
    lr = [float(r["lr"]) for r in csv.DictReader(open(run / "metrics.csv"))]
    assert len(lr) == 20
    plain = [1e-3 * lr_f for lr_f in (__import__("bestrq2.train", fromlist=["lr_factor"]).lr_factor(s, 10, 0.2, 1e-3)
                                      for s in range(1, 7))]
    np.testing.assert_allclose(lr[:6], plain, rtol=1e-3)  # steps before the extension: the old schedule
    steps_down = np.diff(lr[5:])
    assert (steps_down <= 0).all()  # from where it stood, down: no jump up ...
    assert np.abs(steps_down).max() <= np.abs(np.diff(lr[1:6])).max()  # ... and no step bigger than before
    assert lr[-1] == pytest.approx(1e-3 * 1e-3, rel=1e-2)  # the final ratio at the new total


def test_grad_accumulation_matches_full_batch(tmp_path):
    cfg = BestRQ2Config.preset("tiny", encoder_drop_path=0.0)
    a = pretrain(tc(tmp_path / "a", steps=3, batch_size=4), model_cfg=cfg)["losses"]
    b = pretrain(tc(tmp_path / "b", steps=3, batch_size=4, grad_accum=2), model_cfg=cfg)["losses"]
    np.testing.assert_allclose(b, a, rtol=1e-5)


def test_non_finite_losses_skip_then_stop(tmp_path, monkeypatch):
    import bestrq2.train as T

    calls = {"n": 0}
    real = BestRQ2.forward

    def flaky(self, *a, **kw):
        out = real(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] in (2, 4, 5, 6):  # step 2 alone, then steps 4-6 in a row
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(T.BestRQ2, "forward", flaky)
    res = pretrain(tc(tmp_path / "a", steps=3))
    assert res["bad_steps"] == 1 and np.isnan(res["losses"][1]) and np.isfinite(res["losses"][2])
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        pretrain(tc(tmp_path / "b", steps=8, max_bad_steps=3))
    state = torch.load(latest_checkpoint(tmp_path / "b"), weights_only=True)
    assert state["step"] == 6  # saved before stopping
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def _spawn(args, **env):
    return subprocess.Popen([sys.executable, "-m", "bestrq2", "pretrain", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **env})


# The CLI with one change: the second checkpoint's rename waits, so the test can kill the process
# between the write of ckpt-2.pt.tmp and its rename (the window a crash could hit).
SLOW_SECOND_RENAME = """
import os, sys, time
real, seen = os.replace, []
def replace(src, dst):
    if str(src).endswith(".pt.tmp"):
        seen.append(src)
        if len(seen) == 2:
            print("SAVING", dst, flush=True)
            time.sleep(120)
    return real(src, dst)
os.replace = replace
from bestrq2.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_during_save_leaves_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", SLOW_SECOND_RENAME, "pretrain", "--steps", "5", "--batch-size", "2",
                          "--seconds", "1", "--ckpt-every", "1", "--num-workers", "0", "--no-progress", "--out", str(run)],
                         cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline, line = time.time() + 120, ""
    while time.time() < deadline and not line.startswith("SAVING"):
        line = p.stdout.readline()
        if not line and p.poll() is not None:
            break
    os.kill(p.pid, signal.SIGKILL)
    p.wait(30)
    assert line.startswith("SAVING") and line.strip().endswith("ckpt-00000002.pt")
    ck = latest_checkpoint(run)
    state = torch.load(ck, weights_only=True)
    assert state["step"] == 1 and ck.name == "ckpt-00000001.pt"
    assert (run / "checkpoints" / "ckpt-00000002.pt.tmp").exists()  # the torn write is never picked up
    res = pretrain(tc(run, steps=3, extend=True), resume=True)  # and the run continues from step 1
    assert len(res["losses"]) == 2


def test_sigterm_saves_and_exits(tmp_path):
    run = tmp_path / "run"
    p = _spawn(["--steps", "500", "--batch-size", "2", "--seconds", "1", "--num-workers", "0", "--out", str(run)])
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.csv").exists():
        time.sleep(0.2)
    while time.time() < deadline and len(losses_of(run)) < 2:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert "stopping (SIGTERM)" in out
    step = torch.load(latest_checkpoint(run), weights_only=True)["step"]
    assert 2 <= step < 500


def test_export_from_run_dir_and_file(tmp_path):
    pretrain(tc(tmp_path / "run", steps=2))
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "enc")]) == 0
    enc = BestRQ2Encoder.from_pretrained(tmp_path / "enc")
    ck = latest_checkpoint(tmp_path / "run")
    export_encoder(ck, tmp_path / "enc2")
    wave = torch.randn(1, 20_000) * 0.1
    torch.testing.assert_close(enc(wave), BestRQ2Encoder.from_pretrained(tmp_path / "enc2")(wave), rtol=0, atol=0)
    torch.testing.assert_close(enc(wave), BestRQ2Encoder.from_pretrained(tmp_path / "run" / "encoder")(wave), rtol=0, atol=0)
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("argv,flag", [
    (["--lr", "-1"], "--lr"), (["--batch-size", "3", "--grad-accum", "2"], "--batch-size"),
    (["--warmup-pct", "1.5"], "--warmup-pct"), (["--seconds", "0.1"], "--seconds"),
])
def test_bad_cli_values_name_the_flag(tmp_path, capsys, argv, flag):
    assert main(["pretrain", "--out", str(tmp_path / "r"), "--no-progress", *argv]) == 2
    assert flag in capsys.readouterr().err


def test_model_flags_reach_the_run_and_resume_keeps_them(tmp_path, capsys):
    run = tmp_path / "r"
    base = ["pretrain", "--steps", "2", "--batch-size", "2", "--seconds", "1", "--num-workers", "0", "--no-progress"]
    assert main([*base, "--out", str(run), "--mask-ratio", "0.2", "0.3", "--predictor-depth", "1",
                 "--ckpt-every", "1"]) == 0
    cfg = torch.load(latest_checkpoint(run), weights_only=True)["model_config"]
    assert (cfg["mask_ratio_min"], cfg["mask_ratio_max"], cfg["predictor_depth"]) == (0.2, 0.3, 1)
    enc_cfg = json.loads((run / "encoder" / "config.json").read_text())
    assert enc_cfg["predictor_depth"] == 1
    # resuming without the flags continues the same model (its config comes from the checkpoint) ...
    assert main([*base[:2], "3", *base[3:], "--resume", str(run), "--extend"]) == 0
    assert torch.load(latest_checkpoint(run), weights_only=True)["step"] == 3
    # ... and flags that differ from the checkpoint's are refused by name
    capsys.readouterr()
    assert main([*base[:2], "4", *base[3:], "--resume", str(run), "--extend", "--mask-ratio", "0.5", "0.6"]) == 2
    err = capsys.readouterr().err
    assert "mask_ratio_min" in err and "0.2" in err and "predictor_depth" in err
    assert main([*base, "--out", str(tmp_path / "x"), "--one-stage", "--predictor-depth", "2"]) == 2
    assert "--predictor-depth" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "y"), "--mask-ratio", "0.7", "0.5"]) == 2
    assert "mask_ratio_min" in capsys.readouterr().err


def _torchrun(nproc, args, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "bestrq2", "pretrain", *args]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_two_processes_match_one_and_resume_in_one(tmp_path):
    """DDP and FSDP2 with 2 processes give the losses of 1 process with the same global batch; a
    2-process checkpoint resumes in 1 process (plain, no torchrun). One test: the 1-process run is shared."""
    common = ["--steps", "3", "--batch-size", "4", "--seconds", "1", "--num-workers", "0", "--no-progress",
              "--drop-path", "0", "--lr", "1e-3"]
    _torchrun(1, common + ["--out", str(tmp_path / "one")])
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        _torchrun(2, common + ["--out", str(tmp_path / name)] + extra)
        np.testing.assert_allclose(losses_of(tmp_path / name), losses_of(tmp_path / "one"), rtol=1e-5, err_msg=name)
        assert len(list(csv.DictReader(open(tmp_path / name / "metrics.csv")))) == 3  # rank 0 alone logs
        state = torch.load(latest_checkpoint(tmp_path / name), weights_only=True)
        assert state["world_size"] == 2 and state["step"] == 3
        assert main(["pretrain", "--resume", str(tmp_path / name), "--steps", "4", "--extend", "--batch-size", "4",
                     "--seconds", "1", "--num-workers", "0", "--no-progress", "--drop-path", "0", "--lr", "1e-3"]) == 0
        assert len(losses_of(tmp_path / name)) == 4


def test_compile_and_tensorboard(tmp_path):
    """--compile trains (torch.compile of the model, inductor on CPU) and TensorBoard events are written."""
    cfg = BestRQ2Config.preset("tiny", encoder_depth=1, predictor_depth=1)  # compile time grows with depth
    res = pretrain(tc(tmp_path / "run", steps=2, compile=True), model_cfg=cfg)
    assert len(res["losses"]) == 2 and all(np.isfinite(res["losses"]))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(tmp_path / "run" / "tb"))
    ev.Reload()
    assert [e.step for e in ev.Scalars("loss")] == [1, 2]


def test_default_loader_workers(monkeypatch, tmp_path):
    """--num-workers unset: 1 on a CPU; on CUDA the cores per rank minus one, at most 8; a given value wins."""
    from bestrq2.train import loader_workers

    cfg = tc(tmp_path, num_workers=None)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for cores, world, want in ((16, 1, 8), (64, 1, 8), (16, 4, 3), (2, 1, 1), (8, 8, 1)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert loader_workers(cfg, cuda, world) == want
        assert loader_workers(cfg, cpu, world) == 1
    assert loader_workers(tc(tmp_path, num_workers=0), cuda, 1) == 0
    with pytest.raises(ValueError, match="num-workers"):
        tc(tmp_path, num_workers=-1).validate()


def test_cuda_metrics_are_read_two_steps_late(tmp_path, monkeypatch):
    """On CUDA a step's stats are read once two more steps are queued (the card keeps a whole step to run
    through a host hiccup); drain reads the rest, in order."""
    import bestrq2.train_log as tl

    monkeypatch.setattr(tl, "peak_flops", lambda device: None)
    log = tl.MetricsLog(tmp_path, 0, 10, 4, 1.0, torch.device("cuda"), True, 1, False, 5, None, [])
    stats = lambda s: torch.tensor([float(s), 0.5, 0.0, 3.0, 2.0])  # noqa: E731
    for s in range(3):
        log.push(s, stats(s), 1e-4)
        assert log.losses == [float(v) for v in range(max(0, s - 1))]
    log.drain()
    log.close()
    assert log.losses == [0.0, 1.0, 2.0]
    assert [r["step"] for r in csv.DictReader(open(tmp_path / "metrics.csv"))] == ["1", "2", "3"]
