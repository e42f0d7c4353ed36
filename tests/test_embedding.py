"""Embedding many files: batches of mixed lengths equal each clip alone, failures stay with their file,
`bestrq2 embed --out-dir` writes one .npy per file and resumes."""
import numpy as np
import pytest
import soundfile as sf
import torch

from bestrq2 import BestRQ2Config, BestRQ2Encoder
from bestrq2.cli import main
from bestrq2.embedding import embed_files, output_path, takes_lengths
from bestrq2.eval.suite import LogMelStats, clip_features

SR = 16_000


class Recording:
    """An encoder wrapper that records the batch shapes it is called with (and keeps the contract)."""

    def __init__(self, enc, fail_on_length: int | None = None):
        self.enc, self.calls, self.fail_on_length = enc, [], fail_on_length
        self.sampling_rate = enc.sampling_rate
        if hasattr(enc, "num_output_frames"):
            self.num_output_frames = enc.num_output_frames

    def __call__(self, wave, lengths=None, max_batch=64):
        lens = lengths.tolist() if lengths is not None else [wave.shape[1]] * wave.shape[0]
        self.calls.append(lens)
        if self.fail_on_length in lens:
            raise RuntimeError(f"refused a clip of {self.fail_on_length} samples")
        return self.enc(wave, lengths, max_batch=max_batch) if lengths is not None else self.enc(wave)


class NoLengths:
    """An X-ARES encoder that takes no lengths: only clips of one length may share a batch."""

    sampling_rate = SR

    def __init__(self):
        self.mel, self.calls = LogMelStats(), []

    def __call__(self, wave):
        self.calls.append(wave.shape)
        return self.mel(wave)


@pytest.fixture(scope="module")
def enc():
    torch.manual_seed(0)
    return BestRQ2Encoder(BestRQ2Config.preset("tiny", encoder_depth=2)).eval()


def _write(folder, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i, n in enumerate(lengths):
        p = folder / f"clip{i}.wav"
        sf.write(p, (torch.randn(n, generator=g) * 0.1).clamp(-1, 1).numpy(), SR, subtype="FLOAT")
        paths.append(p)
    return paths


def test_batches_of_mixed_lengths_equal_each_clip_alone(tmp_path, enc):
    lengths = [48_000, 12_000, 160_000, 200_000, 33_000, 5_000, 48_000, 90_000]  # 12.5 s runs alone; 5,000 too short
    paths = _write(tmp_path, lengths)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    names = [*paths[:3], tmp_path / "missing.wav", bad, *paths[3:]]
    rec = Recording(enc)
    results = list(embed_files(rec, names, batch_size=3, max_padding=10.0))  # padding allowed: ragged batches
    assert sorted(r.index for r in results) == list(range(len(names)))  # each file once
    by = {r.index: r for r in results}
    assert by[3].error == "file not found" and "cannot read audio" in by[4].error
    assert "shorter than one patch" in by[names.index(paths[5])].error
    assert max(len(c) for c in rec.calls) == 3 and any(len(set(c)) > 1 for c in rec.calls)  # ragged batches
    assert [200_000] in rec.calls  # the file over 10 s ran alone
    for p, n in zip(paths, lengths):
        r = by[names.index(p)]
        if n < 9_375:
            continue
        assert r.error is None and r.seconds == pytest.approx(n / SR)
        alone = enc(torch.from_numpy(sf.read(p, dtype="float32")[0])[None])[0]
        assert r.frames.shape == alone.shape == (enc.num_output_frames(n), 192)
        torch.testing.assert_close(r.frames, alone, rtol=1e-5, atol=1e-5)


def test_batches_hold_padding_within_max_padding():
    """Sorted clips join a batch while its padded time patches stay within max_padding of its clips' own;
    equal lengths always share one; a clip over 10 s runs alone; at most batch_size a batch."""
    from bestrq2.embedding import _batches
    from bestrq2.frontend import num_time_patches

    lens = [12_000, 33_000, 48_000, 48_000, 50_000, 54_000, 90_000, 100_000, 160_000, 160_000, 200_000]
    clips = [(i, "", torch.zeros(n)) for i, n in enumerate(lens)]
    for pad in (0.0, 0.1, 0.5):
        batches = _batches(clips, 3, True, 160_000, pad)
        assert [c[0] for b in batches for c in b] == list(range(len(lens)))
        for b in batches:
            w = [num_time_patches(c[2].shape[0]) for c in b]
            assert len(b) <= 3 and (len(b) == 1 or len(b) * max(w) <= (1 + pad) * sum(w))
        assert [200_000] in [[c[2].shape[0] for c in b] for b in batches]
    widths = lambda pad: [[c[2].shape[0] for c in b] for b in _batches(clips, 3, True, 160_000, pad)]
    assert [48_000, 48_000] in widths(0.0) and [160_000, 160_000] in widths(0.0)
    assert len(widths(0.5)) < len(widths(0.1)) <= len(widths(0.0))
    assert all(len(set(b)) == 1 for b in [[c[2].shape[0] for c in b] for b in _batches(clips, 3, False, 160_000, 9)])
    with pytest.raises(ValueError, match="max_padding"):
        next(embed_files(object(), ["x.wav"], max_padding=-1))


def test_crop_pad_and_mean_pool(tmp_path, enc):
    paths = _write(tmp_path, [8_000, 64_000, 24_000])
    out = {r.index: r for r in embed_files(enc, paths, batch_size=8, max_seconds=2.0, min_seconds=1.0, pool="mean")}
    assert [out[i].padded for i in range(3)] == [True, False, False]
    assert out[1].seconds == 2.0 and out[0].seconds == 0.5
    for i, p in enumerate(paths):
        w = torch.from_numpy(sf.read(p, dtype="float32")[0])[:32_000]
        w = torch.nn.functional.pad(w, (0, max(0, SR - w.shape[0])))
        torch.testing.assert_close(out[i].frames, enc(w[None])[0].mean(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        next(embed_files(enc, paths, batch_size=0))
    with pytest.raises(ValueError, match="pool"):
        next(embed_files(enc, paths, pool="max"))


def test_encoder_without_lengths_batches_equal_lengths_only(tmp_path):
    paths = _write(tmp_path, [20_000, 20_000, 30_000, 20_000, 30_000])
    mel = NoLengths()
    assert not takes_lengths(mel)
    out = {r.index: r for r in embed_files(mel, paths, batch_size=4)}
    assert sorted(c[0] for c in mel.calls) == [2, 3] and all(c[1] in (20_000, 30_000) for c in mel.calls)
    for i, p in enumerate(paths):
        w = torch.from_numpy(sf.read(p, dtype="float32")[0])[None]
        torch.testing.assert_close(out[i].frames, mel(w)[0])


def test_a_failing_batch_is_retried_clip_by_clip(tmp_path, enc):
    paths = _write(tmp_path, [20_000, 21_000, 22_000])
    rec = Recording(enc, fail_on_length=21_000)
    out = {r.index: r for r in embed_files(rec, paths, batch_size=3)}
    assert "refused a clip of 21000" in out[1].error and out[1].frames is None
    assert out[0].error is None and out[2].error is None
    assert rec.calls == [[20_000, 21_000, 22_000], [20_000], [21_000], [22_000]]


def test_clip_features_batched_equal_one_at_a_time(tmp_path, enc):
    paths = [str(p) for p in _write(tmp_path, [8_000, 40_000, 17_000, 160_000])] + [str(tmp_path / "gone.wav")]
    batched = clip_features(enc, paths, batch_size=4)
    single = clip_features(enc, paths, batch_size=1)
    assert batched.ok == single.ok == [0, 1, 2, 3] and batched.padded == 1
    assert batched.skipped == {paths[4]: "file not found"}
    torch.testing.assert_close(batched.x, single.x, rtol=1e-5, atol=1e-5)


def test_cli_embed_folder_writes_resumes_and_reports(tmp_path, enc, capsys):
    model = tmp_path / "model"
    enc.save_pretrained(model)
    audio = tmp_path / "audio"
    (audio / "sub").mkdir(parents=True)
    paths = _write(audio, [20_000, 48_000]) + _write(audio / "sub", [30_000], seed=1)
    (audio / "sub" / "broken.flac").write_bytes(b"nope")
    out = tmp_path / "out"
    args = ["embed", str(audio), "--model", str(model), "--out-dir", str(out), "--batch-size", "2", "--no-progress"]
    assert main(args) == 1  # one file failed; the others are written
    err = capsys.readouterr().err
    assert "1 files failed" in err and "broken.flac" in (out / "embed_errors.tsv").read_text()
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy"))
    assert written == ["clip0.wav.npy", "clip1.wav.npy", "sub/clip0.wav.npy"]
    assert np.load(out / "clip1.wav.npy").shape == (enc.num_output_frames(48_000), 192)
    assert not list(out.rglob("*.tmp*"))
    (out / "clip0.wav.npy").unlink()
    (audio / "sub" / "broken.flac").unlink()
    assert main(args) == 0  # resumed: only the missing output is made again
    assert not (out / "embed_errors.tsv").exists()  # the earlier run's failure list is gone with the failure
    text = capsys.readouterr().out
    assert "2 of 3 files already embedded" in text and "embedded 1 files" in text
    assert main(args + ["--pool", "mean", "--overwrite"]) == 0
    assert np.load(out / "clip1.wav.npy").shape == (192,)
    assert main(["embed", *map(str, paths[:2]), "--model", str(model), "--out", str(tmp_path / "x.npy")]) == 2
    assert "--out-dir" in capsys.readouterr().err
    twin = tmp_path / "twin"
    twin.mkdir()
    _write(twin, [20_000])
    assert main(["embed", str(paths[0]), str(twin / "clip0.wav"), "--model", str(model), "--out-dir",
                 str(out), "--no-progress"]) == 2
    assert "would both be written" in capsys.readouterr().err
    assert output_path(out, audio / "sub" / "a.flac", audio) == out / "sub" / "a.flac.npy"


def test_embed_files_bench_runs(capsys):
    from bench.embed_files import main as bench_main

    assert bench_main(["--preset", "tiny", "--files", "6", "--rounds", "1", "--batch", "1", "4"]) == 0
    out = capsys.readouterr().out
    assert "6 files" in out and "batch   4" in out and "x real time" in out


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32"])
def test_pcm_wav_read_without_soundfile(tmp_path, monkeypatch, subtype):
    """Without soundfile (a --no-deps install, as on the lent GPU machine) PCM WAV files read through the
    standard library to the same samples libsndfile gives; other formats say soundfile is needed."""
    import sys

    from bestrq2.data.folder import load_audio, read_pcm_wav

    g = torch.Generator().manual_seed(1)
    stereo = (torch.rand(3_000, 2, generator=g) * 1.98 - 0.99).numpy()
    path = tmp_path / "x.wav"
    sf.write(path, stereo, 22_050, subtype=subtype)
    want, sr = sf.read(path, dtype="float32", always_2d=True)
    got, sr2 = read_pcm_wav(path)
    assert sr2 == sr == 22_050 and got.shape == want.shape == (3_000, 2)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    with_sf = load_audio(path)
    sf.write(tmp_path / "y.flac", stereo, 16_000)
    monkeypatch.setitem(sys.modules, "soundfile", None)  # import soundfile now raises ImportError
    np.testing.assert_allclose(load_audio(path), with_sf, rtol=0, atol=1e-6)  # mono, resampled to 16 kHz
    with pytest.raises(ValueError, match="soundfile is not installed"):
        load_audio(tmp_path / "y.flac")
