"""A folder of audio files as a pretraining source (a first version; sharded corpora come later).

Files are found recursively (wav, flac, ogg, opus, mp3 as far as libsndfile reads them), mixed down to
mono, resampled to 16 kHz with scipy's polyphase resampler, and cropped to ``seconds`` at an
offset that is a pure function of (seed, index), so a run can be replayed. Shorter files are
zero-padded and keep their true length. Unreadable files are skipped and counted.
"""
from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ..config import MIN_SAMPLES, SAMPLE_RATE


EXTENSIONS = {".wav", ".flac", ".ogg", ".opus", ".mp3"}  # what libsndfile (>= 1.0.29) decodes
log = logging.getLogger(__name__)


def load_audio(path: str | Path, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Read a file -> float32 mono [T] at ``target_sr``. Raises ValueError if it cannot be decoded."""
    import soundfile as sf

    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile's errors vary by format
        raise ValueError(f"cannot read audio file {path}: {err}") from err
    if data.size == 0:
        raise ValueError(f"audio file {path} holds no samples")
    # decoders of lossy formats (vorbis, mp3) can overshoot full scale slightly: clip to [-1, 1]
    wave = np.clip(data.mean(axis=1), -1.0, 1.0)
    if sr != target_sr:
        from scipy.signal import resample_poly

        ratio = Fraction(target_sr, sr).limit_denominator(1000)
        wave = resample_poly(wave, ratio.numerator, ratio.denominator).astype(np.float32)
    return np.ascontiguousarray(wave, dtype=np.float32)


class AudioFolder(torch.utils.data.Dataset):
    """Item i -> (wave float32 [seconds * 16000], true length); the file is picked by i mod count.
    A clip shorter than one patch (0.586 s) is zero-padded to it and counted as that long."""

    def __init__(self, root: str | Path, seconds: float = 10.0, seed: int = 0) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"--data {root}: not a directory")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not self.files:
            raise ValueError(f"--data {root}: no {sorted(EXTENSIONS)} files found")
        self.seconds, self.seed = seconds, seed
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = int(self.seconds * SAMPLE_RATE)
        for attempt in range(len(self.files)):
            path = self.files[(index + attempt) % len(self.files)]
            try:
                wave = load_audio(path)
                break
            except ValueError as err:
                if str(path) not in self.skipped:
                    log.warning("skipping %s", err)
                self.skipped[str(path)] = str(err)
        else:
            raise ValueError(f"no readable audio under {self.root}")
        rng = np.random.default_rng([self.seed, index])
        if wave.shape[0] >= n:
            start = int(rng.integers(0, wave.shape[0] - n + 1))
            return torch.from_numpy(wave[start: start + n].copy()), n
        out = np.zeros(n, dtype=np.float32)
        out[: wave.shape[0]] = wave
        # a clip shorter than one patch column (a click, a short effect) counts as one patch of audio and
        # zeros, as the evaluation pads short clips to 1 s: the model needs >= MIN_SAMPLES per clip
        return torch.from_numpy(out), max(int(wave.shape[0]), MIN_SAMPLES)
