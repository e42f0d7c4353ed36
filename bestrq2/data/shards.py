"""A prepared corpus: decoded 16 kHz mono audio in memory-mapped int16 shards with an index.

``bestrq2 prepare SRC OUT`` decodes every readable file under SRC once (in parallel), and writes
OUT/shard-00000.int16 ... (raw little-endian int16, each about ``shard_mb`` MB) and OUT/index.json
(one entry per clip: shard, offset, length in samples, source path) plus OUT/skipped.json. Training
then reads crops straight from the memory maps: no decoding, no resampling, one page-cache read per
crop, any number of DataLoader workers.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..config import MIN_SAMPLES, SAMPLE_RATE
from .folder import EXTENSIONS, audio_files, load_audio




def _decode(path: str) -> tuple[str, np.ndarray | None, str]:
    try:
        wave = load_audio(path)
    except ValueError as err:
        return path, None, str(err)
    if not np.isfinite(wave).all():
        return path, None, "holds NaN or inf samples"
    return path, to_pcm16(wave), ""


class ShardWriter:
    """Writes int16 clips into OUT/shard-*.int16 (each at most ``shard_mb`` MB) and, on ``close``, the index.
    The index appears last, in one rename, so a corpus interrupted while being written is never taken
    for a prepared one."""

    def __init__(self, out: str | Path, shard_mb: int = 512) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        if (self.out / "index.json").exists():
            raise ValueError(f"prepare: {self.out} already holds a prepared corpus (index.json); choose another OUT")
        self.limit = shard_mb * (1 << 20) // 2  # samples per shard
        self.index: list[dict] = []
        self._id, self._f, self._len = -1, None, 0

    def add(self, pcm: np.ndarray, source: str) -> None:
        """Append one clip: int16 samples [T] (16 kHz mono)."""
        if self._f is None or self._len + len(pcm) > self.limit and self._len > 0:
            if self._f:
                self._f.close()
            self._id += 1
            self._f, self._len = open(self.out / f"shard-{self._id:05d}.int16", "wb"), 0
        self._f.write(np.asarray(pcm, dtype="<i2").tobytes())
        self.index.append({"shard": self._id, "offset": self._len, "length": int(len(pcm)), "source": source})
        self._len += len(pcm)

    def close(self, skipped: dict[str, str] | None = None) -> None:
        if self._f:
            self._f.close()
            self._f = None
        (self.out / "skipped.json").write_text(json.dumps(skipped or {}, indent=1))
        tmp = self.out / "index.json.tmp"
        tmp.write_text(json.dumps({"sample_rate": SAMPLE_RATE, "dtype": "int16", "clips": self.index}))
        os.replace(tmp, self.out / "index.json")


def to_pcm16(wave: np.ndarray) -> np.ndarray:
    """float samples in [-1, 1] -> int16 (rounded, clipped at full scale)."""
    return np.clip(np.round(np.asarray(wave, dtype=np.float32) * 32767.0), -32768, 32767).astype("<i2")


def prepare(src: str | Path, out: str | Path, workers: int | None = None, shard_mb: int = 512,
            progress: bool = True) -> dict:
    """Decode SRC into shards under OUT. Returns {"clips", "hours", "skipped"}."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ValueError(f"prepare: SRC {src} is not a directory")
    files = [str(p) for p in audio_files(src)]
    if not files:
        raise ValueError(f"prepare: no {sorted(EXTENSIONS)} files under {src}")
    writer = ShardWriter(out, shard_mb)
    from tqdm.auto import tqdm

    skipped = {}
    workers = workers or max(1, (os.cpu_count() or 1))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for path, pcm, err in tqdm(pool.map(_decode, files, chunksize=4), total=len(files), desc="prepare",
                                   unit="file", disable=not progress):
            if pcm is None:
                skipped[path] = err
                continue
            writer.add(pcm, os.path.relpath(path, src))
    if not writer.index:
        raise ValueError(f"prepare: none of the {len(files)} files under {src} could be read")
    writer.close(skipped)
    hours = sum(e["length"] for e in writer.index) / SAMPLE_RATE / 3600
    return {"clips": len(writer.index), "hours": hours, "skipped": skipped}


def write_shards(waves, out: str | Path, shard_mb: int = 512) -> Path:
    """Shards from audio already in memory: ``waves`` yields (name, float [T] 16 kHz samples in [-1, 1]).
    No decoder involved (soundfile not needed): what benchmarks and tests build their corpora with."""
    writer = ShardWriter(out, shard_mb)
    for name, wave in waves:
        writer.add(to_pcm16(wave), name)
    if not writer.index:
        raise ValueError("write_shards: no clips given")
    writer.close()
    return Path(out)


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / "index.json").is_file()


class ShardedCorpus(torch.utils.data.Dataset):
    """Item i -> (wave float32 [seconds * 16000], true length): clip i mod count, cropped at an offset
    that is a pure function of (seed, i); shorter clips zero-padded (under one patch, 0.586 s: counted as one
    patch long, as ``AudioFolder`` does)."""

    def __init__(self, root: str | Path, seconds: float = 10.0, seed: int = 0) -> None:
        self.root = Path(root)
        if not is_prepared(self.root):
            raise ValueError(f"--data {root}: no index.json (run `bestrq2 prepare SRC {root}` first)")
        meta = json.loads((self.root / "index.json").read_text())
        if meta.get("sample_rate") != SAMPLE_RATE or meta.get("dtype") != "int16":
            raise ValueError(f"{root}/index.json: expected 16 kHz int16 shards, got {meta.get('sample_rate')} "
                             f"{meta.get('dtype')}")
        self.clips = meta["clips"]
        self.seconds, self.seed = seconds, seed
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return len(self.clips)

    def _shard(self, k: int) -> np.memmap:
        if k not in self._maps:  # opened lazily, so each DataLoader worker maps its own
            self._maps[k] = np.memmap(self.root / f"shard-{k:05d}.int16", dtype="<i2", mode="r")
        return self._maps[k]

    def read_pcm16(self, index: int, out: np.ndarray) -> int:
        """Item ``index``'s crop as int16 PCM into ``out`` (int16 [seconds * 16000], zero-padded); returns the
        true length, as ``__getitem__``. The training loader's path: no float conversion on the host."""
        e = self.clips[index % len(self.clips)]
        n = len(out)
        rng = np.random.default_rng([self.seed, index])
        start = int(rng.integers(0, e["length"] - n + 1)) if e["length"] > n else 0
        take = min(n, e["length"])
        out[:take] = self._shard(e["shard"])[e["offset"] + start: e["offset"] + start + take]
        out[take:] = 0
        return max(take, MIN_SAMPLES)  # a clip under one patch: one patch, zero-padded

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pcm = np.empty(int(self.seconds * SAMPLE_RATE), dtype="<i2")
        length = self.read_pcm16(index, pcm)
        return torch.from_numpy(pcm.astype(np.float32) / 32768.0), length
