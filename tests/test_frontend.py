"""Frontend against independent references: a numpy mel filterbank and a numpy STFT."""
import numpy as np
import pytest
import torch

from bestrq2.frontend import (LogMel, mel_filterbank, num_frames, num_time_patches, patchify, patchify_unfold,
                              truncate_to_patches)
from conftest import float64_twin


def numpy_htk_filterbank(n_freqs=1025, n_mels=128, sr=16000, fmin=0.0, fmax=8000.0):
    """HTK triangles written from the formula in float64: edges equally spaced in mel."""
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    edges = hz(np.linspace(mel(fmin), mel(fmax), n_mels + 2))
    freqs = np.linspace(0, sr / 2, n_freqs)
    fb = np.zeros((n_freqs, n_mels))
    for m in range(n_mels):
        lo, c, hi = edges[m], edges[m + 1], edges[m + 2]
        rise = (freqs - lo) / (c - lo)
        fall = (hi - freqs) / (hi - c)
        fb[:, m] = np.maximum(0, np.minimum(rise, fall))
    return fb


def test_filterbank_matches_formula():
    ref = numpy_htk_filterbank()
    np.testing.assert_allclose(mel_filterbank(dtype=torch.float64).numpy(), ref, atol=1e-12)  # the formula
    ours = mel_filterbank().double().numpy()
    assert ours.shape == (1025, 128)
    # float32 construction (as torchaudio): rounding of the edge frequencies, which depends on the CPU's
    # vector path, bounded by official.FILTERBANK_ATOL's argument (<= ~1.5e-4; seen 1.4e-5)
    np.testing.assert_allclose(ours, ref, atol=1.5e-4)
    assert (ours >= 0).all() and ours.max() <= 1.0 + 1e-6


def test_official_frontend_check_tells_rounding_from_another_frontend():
    from bestrq2.official import FILTERBANK_ATOL, check_frontend

    fb = mel_filterbank()
    rounded = fb + torch.randn_like(fb).clamp(-1, 1) * 2e-5 * (fb > 0)  # another CPU's float32 rounding
    assert torch.equal(check_frontend({"spectrogram.mel_spec.mel_scale.fb": rounded})["fb"], rounded)
    other = torch.from_numpy(numpy_htk_filterbank(fmax=7990.0)).float()  # f_max 10 Hz lower
    assert float((other - fb).abs().max()) > 10 * FILTERBANK_ATOL
    with pytest.raises(ValueError, match="another frontend"):
        check_frontend({"spectrogram.mel_spec.mel_scale.fb": other})
    with pytest.raises(ValueError, match="n_fft 2048, 128 mels"):
        check_frontend({"spectrogram.mel_spec.mel_scale.fb": fb[:, :64]})
    with pytest.raises(ValueError, match="Hann"):
        check_frontend({"spectrogram.mel_spec.spectrogram.window": torch.hamming_window(2048)})


def numpy_logmel(x: np.ndarray) -> np.ndarray:
    """Reflect-pad by n_fft/2, periodic Hann frames every 625 samples, rFFT, window-normalised power."""
    n_fft, hop = 2048, 625
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    xp = np.pad(x, n_fft // 2, mode="reflect")
    n_frames = 1 + len(x) // hop
    frames = np.stack([xp[i * hop: i * hop + n_fft] * win for i in range(n_frames)])
    spec = np.fft.rfft(frames, axis=1) / np.sqrt((win ** 2).sum())
    mel = (np.abs(spec) ** 2) @ numpy_htk_filterbank()
    return 10 * np.log10(np.maximum(mel, 1e-10)).T


@pytest.mark.parametrize("n", [9375, 16000, 37_501])
def test_logmel_matches_numpy(n):
    x = torch.randn(2, n) * 0.1
    ours = LogMel()(x)
    assert ours.shape == (2, 128, num_frames(n))
    exact = float64_twin(LogMel())(x.double())
    for b in range(2):
        ref = numpy_logmel(x[b].double().numpy())
        np.testing.assert_allclose(exact[b].numpy(), ref, atol=1e-9, rtol=0)  # the formula, in float64
        # float32 vs float64 in dB, on noise (every bin within ~30 dB of the peak): FFT rounding ~1e-5 dB,
        # plus the float32 filterbank's (~1.5e-5 relative weights: up to ~2e-3 dB, seen on ATen's scalar path)
        np.testing.assert_allclose(ours[b].numpy(), ref, atol=1e-2, rtol=0)


@pytest.mark.parametrize("batch,n,scale", [(3, 9375, 0.1), (2, 37_501, 1e-3), (1, 160_000, 1.0)])
def test_power_mel_fused_order_as_accurate_as_the_reference(batch, n, scale):
    """The fast power-mel (squares into the mel matmul, normalisation on the mel bins) against the
    authors' order (normalise the complex STFT, abs, square, matmul), both against float64: the fast
    one's error at most 2x the reference's, and the two within float32 rounding of each other."""
    torch.manual_seed(n)
    x = torch.randn(batch, n) * scale
    x[0, : n // 3] = 0.0  # a silent stretch: bins with tiny power
    lm = LogMel()
    fast, ref = lm.power_mel(x), lm._power_mel_reference(x)
    exact = float64_twin(lm, exact_filterbank=False)._power_mel_reference(x.double())  # same float32 filters
    assert fast.shape == ref.shape == (batch, 128, num_frames(n)) and fast.dtype == torch.float32
    floor = 1e-12 * float(exact.abs().max())  # relative error on bins that carry power
    rel = lambda a: ((a.double() - exact).abs() / (exact.abs() + floor)).max().item()  # noqa: E731
    assert rel(fast) <= 2 * rel(ref) + 1e-7
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def test_silence_is_minus_100_db():
    assert torch.equal(LogMel()(torch.zeros(1, 16000)), torch.full((1, 128, 26), -100.0))


def test_batched_on_any_batch_size_equals_single():
    x = torch.randn(3, 20000) * 0.2
    full = LogMel()(x)
    for b in range(3):
        torch.testing.assert_close(LogMel()(x[b: b + 1]), full[b: b + 1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("w", [1, 5, 16, 23])
def test_patchify_official_order(w):
    spec = torch.randn(2, 128, 16 * w + 7)
    cut = truncate_to_patches(spec)
    assert cut.shape[-1] == 16 * w
    p = patchify(cut)
    assert p.shape == (2, 8 * w, 256)
    torch.testing.assert_close(p, patchify_unfold(cut), rtol=0, atol=0)
    f, t, df, dt = 3, w - 1, 5, 11
    assert p[1, f * w + t, df * 16 + dt] == cut[1, 16 * f + df, 16 * t + dt]


def test_frame_counts():
    assert num_frames(160000) == 257 and num_time_patches(160000) == 16
    assert num_time_patches(9375) == 1 and num_time_patches(9374) == 0
    assert num_time_patches(59200) == 5
