"""Embed many audio files in batches: the next files decode on a background thread while the encoder
runs, clips of similar length go through it together, and every file gets back its own frames.

One clip at a time leaves most of an accelerator idle (at batch 1 kernel launches set the time) and some
of a CPU: ViT-B on a 2-core Xeon embedded 10 s files 1.30-1.46x as fast in batches of 8 as alone in float32,
1.11-1.21x in bf16 (``python -m bench.embed_files --fixed 10``, two runs). Here up to ``batch_size`` clips of
at most 10 s run as one padded batch (``lengths`` tells the encoder where each ends, so a clip's frames do not
depend on its neighbours up to float32 rounding). Padding is work too: on that CPU, batches of 8 files of
1-10 s drawn at random, padded to the longest, ran no faster than one file at a time (0.93-1.00x). So the
files of a window of ``8 * batch_size`` are sorted by length, and a batch takes the next clip only while its
padded time patches stay within ``max_padding`` (10%) of its clips' own: then such batches ran 1.13x
(float32) and 1.01x (bf16) as fast as one file at a time (``bench/results/embed_files.txt``). A file longer
than one 10 s chunk runs alone; the encoder cuts it into chunks and runs those ``batch_size`` at a time.

A file that cannot be read, or whose audio the encoder refuses (too short, NaN samples), comes back with
its ``error`` and the others go on; an encoder that fails on a batch is retried clip by clip, so the
error lands on the clip that caused it.
"""
from __future__ import annotations

import inspect
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .config import SAMPLE_RATE


@dataclass
class Embedded:
    """One file's result. ``frames``: [T', D] float32 on the CPU (or [D], the mean over frames, with
    ``pool="mean"``); None when ``error`` says why there are none."""

    index: int  # position in the paths given
    path: str
    frames: torch.Tensor | None = None
    error: str | None = None
    seconds: float = 0.0  # audio embedded (after the max_seconds crop, before any min_seconds padding)
    padded: bool = False  # shorter than min_seconds, zero-padded to it


def _call_parameters(encoder) -> set[str]:
    """The names ``encoder(...)`` takes (empty where Python cannot say)."""
    fn = encoder.forward if isinstance(encoder, torch.nn.Module) else encoder.__call__
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def takes_lengths(encoder) -> bool:
    """Can ``encoder`` run a padded batch of clips of different lengths? It must take ``lengths`` and
    say how many frames a clip gets (``num_output_frames``); otherwise only equal lengths share a batch."""
    return hasattr(encoder, "num_output_frames") and "lengths" in _call_parameters(encoder)


def _read(index: int, path: str, max_seconds: float | None, min_seconds: float | None):
    """(index, path, wave [T] float32 or None, error or None, seconds, padded)."""
    from .data.folder import load_audio
    from .inputs import check_wave

    if not os.path.exists(path):
        return index, path, None, "file not found", 0.0, False
    try:
        wave = torch.from_numpy(load_audio(path))
        if max_seconds is not None:
            wave = wave[: int(max_seconds * SAMPLE_RATE)]
        seconds, padded = wave.shape[0] / SAMPLE_RATE, False
        if min_seconds is not None and wave.shape[0] < int(min_seconds * SAMPLE_RATE):
            wave = torch.nn.functional.pad(wave, (0, int(min_seconds * SAMPLE_RATE) - wave.shape[0]))
            padded = True
        check_wave(wave[None])  # a clip the encoder would refuse fails here alone, not its whole batch
        return index, path, wave, None, seconds, padded
    except (ValueError, RuntimeError, OSError) as err:
        return index, path, None, str(err).splitlines()[0][:300], 0.0, False


def _batches(clips: list, batch_size: int, ragged: bool, chunk: int, max_padding: float) -> list[list]:
    """Clips (sorted by length) -> batches: a clip over one chunk alone; otherwise up to ``batch_size``
    neighbours: of one length if the encoder takes no ``lengths``; else of any lengths as long as the batch's
    padded time patches (count x the longest clip's) exceed its clips' own by at most ``max_padding``."""
    from .frontend import num_time_patches

    out: list[list] = []
    width = 0  # time patches of the clips in out[-1]
    for clip in clips:
        n = clip[2].shape[0]
        w = num_time_patches(n) if ragged else n
        last = out[-1] if out else None
        if (n <= chunk and last is not None and len(last) < batch_size and last[0][2].shape[0] <= chunk
                and (last[0][2].shape[0] == n
                     or (ragged and (len(last) + 1) * w <= (1 + max_padding) * (width + w)))):
            last.append(clip)
            width += w
        else:
            out.append([clip])
            width = w
    return out


def _to_tensor(frames) -> torch.Tensor:
    return torch.as_tensor(frames).detach().float().cpu()


def _run_batch(encoder, batch: list, extra: dict) -> list[torch.Tensor]:
    """Frames [T'_i, D] of each clip of one batch; ``extra``: keyword arguments for every encoder call."""
    lens = [c[2].shape[0] for c in batch]
    wave = torch.zeros(len(batch), max(lens))
    for j, c in enumerate(batch):
        wave[j, : lens[j]] = c[2]
    with torch.no_grad():
        if len(set(lens)) == 1:
            out = _to_tensor(encoder(wave, **extra))
            return [out[j] for j in range(len(batch))]
        out = _to_tensor(encoder(wave, torch.tensor(lens), **extra))
    return [out[j, : encoder.num_output_frames(n)] for j, n in enumerate(lens)]


def _run_or_each(encoder, batch: list, extra: dict) -> list[tuple]:
    """[(clip, frames or None, error or None)] of one batch; if the encoder fails on the batch, each clip
    alone, so that the error lands on the clip that causes it."""
    try:
        return [(c, f, None) for c, f in zip(batch, _run_batch(encoder, batch, extra))]
    except (ValueError, RuntimeError) as err:
        if len(batch) == 1:
            return [(batch[0], None, str(err).splitlines()[0][:300])]
    out = []
    for c in batch:
        out.extend(_run_or_each(encoder, [c], extra))
    return out


def embed_files(encoder, paths: Sequence[str | os.PathLike], batch_size: int = 8,
                max_seconds: float | None = None, min_seconds: float | None = None, pool: str = "none",
                progress: bool = False, desc: str = "embed", max_padding: float = 0.1,
                window: int | None = None) -> Iterator[Embedded]:
    """Embed every file of ``paths`` with ``encoder`` (``BestRQ2Encoder``, ``onnx.OnnxEncoder`` or any
    callable on [B, T] 16 kHz waveforms), yielding one ``Embedded`` per file as its batch finishes: in
    windows of ``window`` files (default ``8 * batch_size``), within a window shortest first (use ``.index``
    to put them back in order). max_padding: how much of a batch may be padding, as a fraction of its clips'
    own time patches (0: equal widths only).

    max_seconds: embed only the first ``max_seconds`` of a file. min_seconds: zero-pad shorter audio to
    that length (``padded``; X-ARES pads clips under 1 s to 1 s). pool: "none" (frames [T', D]) or
    "mean" (their mean over time, [D]). progress: a bar over files with the audio rate."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_padding < 0:
        raise ValueError(f"max_padding must be >= 0, got {max_padding}")
    if pool not in ("none", "mean"):
        raise ValueError(f"pool must be 'none' or 'mean', got {pool!r}")
    from tqdm.auto import tqdm

    from .config import BestRQ2Config

    paths = [str(p) for p in paths]
    ragged = takes_lengths(encoder)
    # a long file's chunks go through the encoder batch_size at a time
    extra = {"max_batch": batch_size} if ragged and "max_batch" in _call_parameters(encoder) else {}
    chunk = getattr(getattr(encoder, "config", None), "chunk_samples", BestRQ2Config().chunk_samples)
    window = window or 8 * batch_size
    starts = range(0, len(paths), window)

    def read_window(s: int) -> list:
        return [_read(i, paths[i], max_seconds, min_seconds) for i in range(s, min(s + window, len(paths)))]

    bar = tqdm(total=len(paths), desc=desc, unit="file", disable=not progress, leave=False)
    audio = 0.0
    try:
        # decoding (libsndfile, resampling) runs on a thread of its own, overlapping the encoder
        with ThreadPoolExecutor(max_workers=1) as reader:
            pending = reader.submit(read_window, starts[0]) if paths else None
            for k in range(len(starts)):
                clips = pending.result()
                pending = reader.submit(read_window, starts[k + 1]) if k + 1 < len(starts) else None
                for i, path, _, err, _, _ in (c for c in clips if c[2] is None):
                    bar.update(1)
                    yield Embedded(i, path, error=err)
                ok = sorted((c for c in clips if c[2] is not None), key=lambda c: c[2].shape[0])
                for batch in _batches(ok, batch_size, ragged, chunk, max_padding):
                    for (i, path, _, _, seconds, padded), frames, err in _run_or_each(encoder, batch, extra):
                        if frames is not None and pool == "mean":
                            frames = frames.mean(dim=0)
                        audio += seconds if err is None else 0.0
                        bar.update(1)
                        bar.set_postfix(audio_s=f"{audio:.0f}", refresh=False)
                        yield Embedded(i, path, frames, err, seconds if err is None else 0.0, padded)
    finally:  # (also when the caller stops early)
        bar.close()


def output_path(out_dir: Path, path: Path, root: Path | None) -> Path:
    """Where ``bestrq2 embed --out-dir`` writes a file's frames: ``out_dir / <path relative to root>.npy``
    (the audio suffix kept: a.wav and a.flac do not collide), or ``out_dir / <name>.npy`` without a root."""
    rel = path.relative_to(root) if root is not None else Path(path.name)
    return out_dir / rel.parent / (rel.name + ".npy")


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` whole or not at all (a temporary file, then a rename): a run stopped
    midway leaves no half-written file for a resumed run to take as done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)
