"""check_wave's one-pass check (aminmax) finds every bad sample the per-sample checks found: NaN, +-inf and
out-of-range peaks, alone in a batch of good audio, at the first and last sample and at positions that fall
in a vector loop's tail. Runs again under ATEN_CPU_CAPABILITY=default in `make test` (another reduction path)."""
import pytest
import torch

from bestrq2.inputs import check_wave


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("t", [9_375, 16_000 + 13])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_bad_sample_anywhere_is_found(dtype, t, bad):
    gen = torch.Generator().manual_seed(t)
    wave = (torch.rand(3, t, generator=gen) * 2 - 1).to(dtype)
    check_wave(wave)  # good audio passes
    for clip, pos in ((0, 0), (2, t - 1), (1, t - 3), (1, t // 2 + 1), (2, int(torch.randint(t, (1,), generator=gen)))):
        w = wave.clone()
        w[clip, pos] = bad
        with pytest.raises(ValueError, match=rf"NaN or inf samples \(clips \[{clip}\]\)"):
            check_wave(w)


@pytest.mark.parametrize("value", [2.5, -2.5, 40_000.0])
def test_one_loud_sample_is_found(value):
    wave = torch.rand(4, 10_007) * 2 - 1
    wave[3, 10_006] = value
    with pytest.raises(ValueError, match=f"peaks at {abs(value):.1f}"):
        check_wave(wave)
    wave[3, 10_006] = 1.99 if value > 0 else -1.99  # up to 2 passes (decoders overshoot full scale a little)
    assert check_wave(wave)[0].dtype == torch.float32


def test_nan_beside_loud_sample_reports_nan():
    wave = torch.zeros(2, 10_000)
    wave[0, 5], wave[1, 9] = 100.0, float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf samples \(clips \[1\]\)"):
        check_wave(wave)
