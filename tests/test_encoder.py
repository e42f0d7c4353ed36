"""The inference encoder: X-ARES contract, padded batches equal single runs, long audio, bad input."""
import numpy as np
import pytest
import torch

from bestrq2 import BestRQ2Config, BestRQ2Encoder


@pytest.fixture(scope="module", params=["grid", "official"])
def enc(request):
    torch.manual_seed(0)
    return BestRQ2Encoder(BestRQ2Config.preset("tiny", encoder_depth=2, pos_layout=request.param)).eval()


def test_contract_attributes(enc):
    assert enc.sampling_rate == 16000 and enc.hop_size_in_ms == 625.0 and enc.output_dim == 192


def test_frames_are_frequency_means_of_tokens(enc):
    wave = torch.randn(2, 160_000) * 0.1
    tok = enc.tokens(wave)
    assert tok.shape == (2, 128, 192)
    torch.testing.assert_close(enc(wave), tok.view(2, 8, 16, 192).mean(1))


def test_padded_batch_equals_each_clip_alone(enc):
    lengths = torch.tensor([160_000, 37_000, 9_375, 100_001])
    wave = torch.randn(4, 160_000) * 0.1
    frames = enc(wave, lengths)
    assert frames.shape == (4, 16, 192)
    for b, n in enumerate(lengths.tolist()):
        alone = enc(wave[b: b + 1, :n])
        w = alone.shape[1]
        assert w == enc.num_output_frames(n)
        torch.testing.assert_close(frames[b: b + 1, :w], alone, rtol=1e-5, atol=1e-5)
        assert bool((frames[b, w:] == 0).all())
        tok_alone = enc.tokens(wave[b: b + 1, :n])
        tok = enc.tokens(wave, lengths)[b].view(8, 16, 192)[:, :w].reshape(1, -1, 192)
        torch.testing.assert_close(tok, tok_alone, rtol=1e-5, atol=1e-5)


def test_long_audio_chunks():
    enc = BestRQ2Encoder(BestRQ2Config.preset("tiny", encoder_depth=2)).eval()  # chunking: any layout
    n = 2 * 160_000 + 12_000  # two full chunks and a 0.75 s tail (padded to 1 s, one frame)
    wave = torch.randn(1, n) * 0.1
    frames = enc(wave)
    assert frames.shape[1] == enc.num_output_frames(n) == 33
    torch.testing.assert_close(frames[:, :16], enc(wave[:, :160_000]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frames[:, 16:32], enc(wave[:, 160_000:320_000]), rtol=1e-5, atol=1e-5)
    tail = torch.zeros(1, 16_000)
    tail[:, :12_000] = wave[:, 320_000:]
    torch.testing.assert_close(frames[:, 32:], enc(tail)[:, :1], rtol=1e-5, atol=1e-5)
    # a batch of a long and a short clip with lengths: each as alone, chunked in small groups
    both = torch.zeros(2, n)
    both[0], both[1, :50_000] = wave[0], wave[0, :50_000]
    out = enc(both, torch.tensor([n, 50_000]), max_batch=2)
    torch.testing.assert_close(out[0:1], frames, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:2, :5], enc(wave[:, :50_000]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (torch.full((1, 20_000), float("nan")), "NaN"),
    (torch.tensor([[0.0, float("inf")] * 10_000]), "NaN or inf"),
    (torch.zeros(1, 0), "empty"),
    (torch.zeros(1, 9_000), "shorter than one patch"),
    (torch.zeros(20_000), r"\[B, T\]"),
    (torch.zeros(1, 2, 20_000), "mono"),
    (torch.zeros(1, 20_000, dtype=torch.int16), "int16: integer PCM"),
    (torch.zeros(1, 20_000, dtype=torch.uint8), "uint8: integer PCM"),
    (torch.zeros(1, 20_000, dtype=torch.bool), "bool: a mask, not audio"),
    (torch.zeros(1, 20_000, dtype=torch.complex64), "complex64: complex values are not audio"),
    (np.zeros((1, 20_000), dtype=np.complex128), "complex128: complex"),
    (torch.full((1, 20_000), 300.0), "unscaled integer PCM"),
    ([0.0] * 20_000, "torch.Tensor"),
])
def test_bad_input_raises_value_error(enc, bad, match):
    with pytest.raises(ValueError, match=match):
        enc(bad)


def test_bad_lengths_and_sample_rate(enc):
    wave = torch.zeros(2, 20_000)
    with pytest.raises(ValueError, match="exceed"):
        enc(wave, torch.tensor([20_000, 30_000]))
    with pytest.raises(ValueError, match="shorter than one patch"):
        enc(wave, torch.tensor([20_000, 100]))
    with pytest.raises(ValueError, match="integer tensor"):
        enc(wave, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="44100 Hz"):
        enc(wave, sample_rate=44100)
    with pytest.raises(ValueError, match="at most 10 s"):
        enc.tokens(torch.zeros(1, 170_000))


def test_numpy_and_authors_layout_accepted(enc):
    x = np.random.default_rng(0).standard_normal((1, 20_000)).astype(np.float32) * 0.1
    torch.testing.assert_close(enc(x), enc(torch.from_numpy(x)[:, None]))


def test_save_and_load_round_trip(tmp_path, enc):
    enc.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    again = BestRQ2Encoder.from_pretrained(tmp_path)
    assert again.config == enc.config
    wave = torch.randn(1, 30_000) * 0.1
    torch.testing.assert_close(again(wave), enc(wave), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        BestRQ2Encoder.from_pretrained(tmp_path / "nope")
