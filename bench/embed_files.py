"""Embedding a folder of files one clip at a time against ``bestrq2.embedding.embed_files``' batches, in one
process, interleaved (the order reversed every other round): what ``bestrq2 embed --out-dir`` and the
evaluation's feature pass gain from batching.

``python -m bench.embed_files [--preset base] [--files 24] [--batch 1 8] [--rounds 3] [--precision auto]
[--fixed SECONDS] [--device cpu]`` writes ``--files`` wav files of 1-12 s (lengths drawn once, seeded; one
in six over 10 s, so it runs alone; or all ``--fixed`` s) to a temporary folder and prints, per batch size,
the wall time of the whole pass (median and minimum over rounds), the audio rate (seconds of audio per
second) and each pass's paired ratio against the first batch size (median): above 1.0x batching is faster.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_corpus(folder: Path, n: int, seed: int = 0, fixed: float | None = None) -> tuple[list[Path], float]:
    """n wav files of 1-12 s, or all ``fixed`` s (16-bit PCM noise, written with the standard library's
    ``wave``, so that the GPU machine, which has no soundfile, runs it too); (paths, seconds of audio in all)."""
    import wave

    rng = np.random.default_rng(seed)
    paths, total = [], 0.0
    for i in range(n):
        seconds = float(rng.uniform(10.5, 12.0)) if i % 6 == 5 else float(rng.uniform(1.0, 10.0))
        seconds = fixed if fixed is not None else seconds
        pcm = (rng.standard_normal(int(seconds * 16_000)) * 3_000).clip(-32768, 32767).astype("<i2")
        paths.append(folder / f"f{i:03d}.wav")
        with wave.open(str(paths[-1]), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16_000)
            w.writeframes(pcm.tobytes())
        total += len(pcm) / 16_000
    return paths, total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.embed_files", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--files", type=int, default=24)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fixed", type=float, default=None, help="every file this many seconds long")
    args = ap.parse_args(argv)
    from bestrq2 import BestRQ2Config, BestRQ2Encoder
    from bestrq2.embedding import embed_files

    from .common import commit, device_name, versions

    device = torch.device(args.device)
    torch.manual_seed(0)
    enc = BestRQ2Encoder(BestRQ2Config.preset(args.preset), precision=args.precision).eval().to(device)
    paths, audio = write_corpus(Path(tempfile.mkdtemp()), args.files, fixed=args.fixed)
    print(f"{args.preset} encoder ({enc.precision_in_use}) on {device_name(device)}, "
          f"{versions()}, commit {commit()}; {args.files} files, {audio:.0f} s of audio; wall s per pass, "
          f"{args.rounds} rounds interleaved")

    def one_pass(b: int) -> float:
        t0 = time.perf_counter()
        n = sum(r.error is None for r in embed_files(enc, paths, batch_size=b))
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert n == len(paths)
        return time.perf_counter() - t0

    for b in args.batch:  # warm-up (and CUDA graphs / packed weights made)
        one_pass(b)
    wall: dict[int, list[float]] = {b: [] for b in args.batch}
    for r in range(args.rounds):
        for b in (args.batch if r % 2 == 0 else args.batch[::-1]):
            wall[b].append(one_pass(b))
    first = args.batch[0]
    for b in args.batch:
        med = statistics.median(wall[b])
        ratio = statistics.median(a / x for a, x in zip(wall[first], wall[b]))
        print(f"  batch {b:3d}  median {med:7.2f} s  min {min(wall[b]):7.2f} s  {audio / med:7.1f}x real time"
              f"  batch {first} / this {ratio:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
