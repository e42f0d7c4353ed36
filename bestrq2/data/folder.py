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


def audio_files(root: Path) -> list[Path]:
    """Every file under ``root`` (recursively) with an ``EXTENSIONS`` suffix, sorted."""
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())


def read_pcm_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A PCM WAV file (8-, 16-, 24- or 32-bit integer samples) through the standard library's ``wave``:
    (float32 [T, channels] in [-1, 1), sample rate), scaled as libsndfile scales them (by 2^(bits - 1); 8-bit
    is unsigned around 128). What ``load_audio`` reads where soundfile is not installed (the lent GPU
    machine had none)."""
    import wave

    with wave.open(str(path), "rb") as w:
        channels, width, sr = w.getnchannels(), w.getsampwidth(), w.getframerate()
        raw = w.readframes(w.getnframes())
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:  # little-endian 24-bit: widened to int32 with the sign carried
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        x = (((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8) >> 8).astype(np.float32) / 2.0 ** 23
    elif width in (2, 4):
        x = np.frombuffer(raw, f"<i{width}").astype(np.float32) / 2.0 ** (8 * width - 1)
    else:
        raise ValueError(f"{width * 8}-bit PCM is not a WAV sample width this reader knows")
    return x.reshape(-1, channels), sr


def load_audio(path: str | Path, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Read a file -> float32 mono [T] at ``target_sr``. Raises ValueError if it cannot be decoded.
    Without soundfile (a ``--no-deps`` install) only PCM WAV files are read (``read_pcm_wav``)."""
    try:
        import soundfile as sf
    except ImportError:
        sf = None
    try:
        if sf is not None:
            data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        elif Path(path).suffix.lower() == ".wav":
            data, sr = read_pcm_wav(path)
        else:
            raise ValueError("soundfile is not installed (pip install soundfile): without it only PCM .wav "
                             "files can be read")
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
        self.files = audio_files(self.root)
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
