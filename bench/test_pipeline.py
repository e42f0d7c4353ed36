"""pytest-benchmark cases for the data pipeline (run by ``python -m bench --suite cpu``, not by CI's
test command). Each reports seconds per call; the suite converts them to clips/s per CPU core."""
import numpy as np
import pytest
import soundfile as sf
import torch

from bestrq2.data import AudioFolder
from bestrq2.data.synthetic import synth_clip
from bestrq2.frontend import LogMel

torch.set_num_threads(1)  # per-core numbers


def test_synthetic_clip(benchmark):
    i = iter(range(10**9))
    out = benchmark(lambda: synth_clip(0, next(i)))
    assert out.shape == (160_000,)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    for j in range(8):
        sf.write(d / f"c{j}.flac", (rng.standard_normal(16000 * 12) * 0.1).astype(np.float32), 16000)
        sf.write(d / f"w{j}.wav", (rng.standard_normal((44100 * 11, 2)) * 0.1).astype(np.float32), 44100)
    return AudioFolder(d, seconds=10.0)


def test_audio_folder_flac_16k(benchmark, folder):
    i = iter(range(10**9))
    flac = [k for k, p in enumerate(folder.files) if p.suffix == ".flac"]
    benchmark(lambda: folder[flac[next(i) % len(flac)]])


def test_audio_folder_wav_44k_stereo_resampled(benchmark, folder):
    i = iter(range(10**9))
    wav = [k for k, p in enumerate(folder.files) if p.suffix == ".wav"]
    benchmark(lambda: folder[wav[next(i) % len(wav)]])


def test_logmel_frontend_batch8(benchmark):
    lm, x = LogMel(), torch.randn(8, 160_000) * 0.1
    out = benchmark(lambda: lm(x))
    assert out.shape == (8, 128, 257)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, folder):
    from bestrq2.data.shards import ShardedCorpus, prepare

    out = tmp_path_factory.mktemp("prepared") / "corpus"
    prepare(folder.root, out, workers=1, progress=False)
    return ShardedCorpus(out, seconds=10.0)


def test_prepared_shards_crop(benchmark, prepared):
    i = iter(range(10**9))
    w, n = benchmark(lambda: prepared[next(i)])
    assert w.shape == (160_000,)


@pytest.mark.parametrize("kind", ["int16", "float32"])
def test_step_batch_shards_b64(benchmark, prepared, kind):
    """One training batch of 64 x 10 s from the shards, as a loader worker builds it: int16 PCM (now) or
    float32 (before; the host also checked every float sample, see test_check_wave_b64)."""
    from bestrq2.train import StepBatches

    batches = StepBatches(prepared, 64, 0, 64, pcm16=kind == "int16")
    i = iter(range(10**9))
    wave, _ = benchmark(lambda: batches[next(i)])
    assert wave.shape == (64, 160_000) and wave.dtype == getattr(torch, kind)


def test_check_wave_b64(benchmark):
    """The host's value check of a float batch (int16 batches need none)."""
    from bestrq2.inputs import check_wave

    w = torch.randn(64, 160_000) * 0.1
    benchmark(lambda: check_wave(w))
