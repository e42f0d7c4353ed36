"""A procedurally generated audio corpus, so pretraining runs with no files at all.

Clip i is a pure function of (seed, i): speech-like syllables (harmonic glottal source shaped by
formants, with intonation, plus fricative noise), tonal events (harmonic notes and chords with
vibrato and decay) and noise events (band-limited bursts, clicks, sweeps) over a quiet coloured
noise floor. Not a substitute for real audio, but it has the spectro-temporal structure
(harmonics, formants, onsets, bands) that masked-patch prediction can learn from.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import SAMPLE_RATE




def _envelope(n: int, attack: int, release: int) -> np.ndarray:
    env = np.ones(n, dtype=np.float32)
    a, r = min(attack, n // 2), min(release, n // 2)
    if a:
        env[:a] = np.linspace(0, 1, a, dtype=np.float32)
    if r:
        env[n - r:] *= np.linspace(1, 0, r, dtype=np.float32)
    return env


TABLE = 2048


def _harmonic(phase: np.ndarray, amps: np.ndarray) -> np.ndarray:
    """sum_k amps[k] sin((k + 1) phase) through a one-period wavetable: O(T) instead of O(T K)."""
    spec = np.zeros(TABLE // 2 + 1, dtype=np.complex128)
    spec[1: len(amps) + 1] = -0.5j * TABLE * amps  # inverse FFT of these bins is sum_k a_k sin(k x)
    table = np.fft.irfft(spec, TABLE)
    idx = (phase * (TABLE / (2 * np.pi))).astype(np.int32) & (TABLE - 1)  # phase >= 0, TABLE = 2^11
    return table.astype(np.float32)[idx]


def _band_noise(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    spec[(f < lo) | (f > hi)] = 0
    x = np.fft.irfft(spec, n)
    return (x / (np.abs(x).max() + 1e-9)).astype(np.float32)


def _speech(rng: np.random.Generator, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    base_f0 = rng.uniform(90, 240)
    t = 0
    while t < n:
        syl = int(rng.uniform(0.12, 0.32) * SAMPLE_RATE)
        seg = min(syl, n - t)
        if seg < 200:
            break
        tt = np.arange(seg) / SAMPLE_RATE
        f0 = base_f0 * (1 + rng.uniform(-0.15, 0.15) + rng.uniform(-0.3, 0.3) * tt)  # intonation
        phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
        formants = rng.uniform([300, 900, 2200], [900, 2300, 3300])
        h = np.arange(1, int(4000 / f0.mean()) + 1)
        hf = h * f0.mean()
        amp = sum(np.exp(-0.5 * ((hf - fm) / (60 + 0.08 * fm)) ** 2) for fm in formants) / h ** 0.7
        voiced = _harmonic(phase, amp)
        voiced = voiced / (np.abs(voiced).max() + 1e-9) * _envelope(seg, int(0.02 * SAMPLE_RATE), int(0.05 * SAMPLE_RATE))
        out[t: t + seg] += voiced.astype(np.float32)
        t += seg
        if rng.random() < 0.3 and t < n:  # fricative
            fr = min(int(rng.uniform(0.04, 0.12) * SAMPLE_RATE), n - t)
            if fr > 100:
                out[t: t + fr] += 0.4 * _band_noise(rng, fr, rng.uniform(2500, 4000), 7800) * _envelope(fr, 80, 200)
                t += fr
        t += int(rng.uniform(0.0, 0.15) * SAMPLE_RATE)  # pause
    return out


def _tonal(rng: np.random.Generator, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    t = 0
    while t < n:
        dur = min(int(rng.uniform(0.15, 1.2) * SAMPLE_RATE), n - t)
        if dur < 200:
            break
        tt = np.arange(dur) / SAMPLE_RATE
        notes = 440 * 2 ** ((rng.integers(-24, 20, size=rng.integers(1, 4)) / 12))
        decay = rng.uniform(0.5, 6)
        tone = np.zeros(dur)
        for f in notes:
            vib = 1 + 0.004 * np.sin(2 * np.pi * rng.uniform(4, 7) * tt) * (rng.random() < 0.5)
            phase = 2 * np.pi * np.cumsum(f * vib) / SAMPLE_RATE
            nh = max(1, min(12, int(7000 / f)))
            tone += _harmonic(phase, 1.0 / np.arange(1, nh + 1) ** rng.uniform(0.5, 2.0))
        tone *= np.exp(-decay * tt)
        out[t: t + dur] += (tone / (np.abs(tone).max() + 1e-9) * _envelope(dur, 40, 400)).astype(np.float32)
        t += dur + int(rng.uniform(0, 0.3) * SAMPLE_RATE)
    return out


def _noise_events(rng: np.random.Generator, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    for _ in range(rng.integers(2, 9)):
        kind = rng.integers(3)
        dur = int(rng.uniform(0.02, 1.0) * SAMPLE_RATE)
        start = int(rng.integers(0, max(1, n - dur)))
        dur = min(dur, n - start)
        if dur < 64:
            continue
        if kind == 0:  # band-limited burst
            lo = rng.uniform(50, 5000)
            ev = _band_noise(rng, dur, lo, min(7900, lo * rng.uniform(1.3, 4)))
        elif kind == 1:  # click train
            ev = np.zeros(dur, dtype=np.float32)
            ev[:: int(rng.uniform(0.005, 0.1) * SAMPLE_RATE)] = 1.0
        else:  # sweep
            f = np.geomspace(rng.uniform(100, 2000), rng.uniform(200, 7500), dur)
            ev = np.sin(2 * np.pi * np.cumsum(f) / SAMPLE_RATE).astype(np.float32)
        out[start: start + dur] += ev * _envelope(dur, 32, dur // 4) * rng.uniform(0.3, 1.0)
    return out


def synth_clip(seed: int, index: int, seconds: float = 10.0) -> np.ndarray:
    """Clip ``index`` of corpus ``seed``: float32 [seconds * 16000] in [-1, 1]."""
    rng = np.random.default_rng([int(seed), int(index)])
    n = int(seconds * SAMPLE_RATE)
    mix = np.zeros(n, dtype=np.float32)
    kinds = rng.choice(3, size=rng.integers(1, 4), replace=True)
    for k in kinds:
        gen = (_speech, _tonal, _noise_events)[k]
        mix += gen(rng, n) * rng.uniform(0.2, 0.6)
    floor = np.cumsum(rng.standard_normal(n)).astype(np.float32)  # brown-ish noise floor
    c = np.concatenate([[0.0], np.cumsum(floor, dtype=np.float64)])  # remove a 401-sample moving mean
    lo, hi = np.clip(np.arange(n) - 200, 0, n), np.clip(np.arange(n) + 201, 0, n)
    floor = floor - ((c[hi] - c[lo]) / (hi - lo)).astype(np.float32)
    mix += floor / (np.abs(floor).max() + 1e-9) * rng.uniform(0.002, 0.02)
    peak = np.abs(mix).max()
    return (mix / peak * rng.uniform(0.3, 0.9)).astype(np.float32) if peak > 0 else mix


class SyntheticCorpus(torch.utils.data.Dataset):
    """An endless (``len`` is nominal) indexable corpus: item i -> (wave float32 [T], length)."""

    def __init__(self, seed: int = 0, seconds: float = 10.0, size: int = 1 << 30) -> None:
        self.seed, self.seconds, self.size = seed, seconds, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        wave = torch.from_numpy(synth_clip(self.seed, index, self.seconds))
        return wave, wave.shape[0]
