"""``bestrq2 codes``: how the quantizer's codes are used on some audio (target health).

Reads audio files, folders of them, or a prepared corpus; computes every patch's code (codebook 0)
with a run's quantizer (``--run``: its checkpoint, normalisation statistics included) or a fresh one
(``--seed``, ``--rpq-norm``); reports distinct codes, perplexity (exp of the entropy in nats), the top
code's share, overall and per frequency band (the 8 rows of 16 mel bins); optionally a plot of the
sorted code frequencies.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .config import MIN_SAMPLES, SAMPLE_RATE, BestRQ2Config
from .frontend import LogMel, truncate_to_patches
from .model import BestRQ2
from .quantizer import RandomProjectionQuantizer


def usage(codes: torch.Tensor, k: int) -> dict:
    """codes: int [n] -> distinct codes, perplexity, top share, entropy (nats), patches."""
    counts = torch.bincount(codes.reshape(-1).long(), minlength=k).double()
    p = counts / counts.sum().clamp_min(1)
    h = float(-(p[p > 0] * p[p > 0].log()).sum())
    return {"patches": int(counts.sum()), "codes_used": int((counts > 0).sum()), "perplexity": math.exp(h),
            "entropy_nats": h, "top_share": float(p.max())}


def _audio_paths(paths: list[str]) -> list[Path]:
    exts = {".wav", ".flac", ".ogg", ".mp3", ".oga", ".aiff", ".aif"}
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in exts)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out


def clip_source(paths: list[str], seconds: float, max_clips: int):
    """Waves (float32 [T], at most ``seconds``) of the inputs: a prepared corpus, or audio files/folders."""
    from .data.folder import load_audio
    from .data.shards import ShardedCorpus, is_prepared

    if len(paths) == 1 and is_prepared(paths[0]):
        corpus = ShardedCorpus(paths[0], seconds=seconds, seed=0)
        for i in range(min(max_clips, len(corpus))):
            wave, n = corpus[i]
            yield f"{paths[0]}#{i}", wave[: max(int(n), MIN_SAMPLES)]
        return
    for p in _audio_paths(paths)[:max_clips]:
        try:
            wave = torch.from_numpy(load_audio(str(p)))[: int(seconds * SAMPLE_RATE)]
        except ValueError as err:
            print(f"skipping {p}: {err}")
            continue
        if wave.shape[0] >= MIN_SAMPLES:
            yield str(p), wave


def run(paths: list[str], run_dir: str | None = None, seed: int = 0, rpq_norm: str = "none", seconds: float = 10.0,
        max_clips: int = 256, plot: str | None = None) -> dict:
    if run_dir:
        from .checkpoints import latest_checkpoint

        state = torch.load(latest_checkpoint(run_dir), map_location="cpu", weights_only=True)
        model = BestRQ2(BestRQ2Config.from_dict(state["model_config"]))
        model.load_state_dict(state["model"])
        cfg, frontend, q = model.config, model.frontend, model.quantizer
    else:  # the paper's quantizer shape with this seed and normalisation; no model needed around it
        cfg = BestRQ2Config(seed=seed, rpq_norm=rpq_norm)
        frontend = LogMel()
        q = RandomProjectionQuantizer(cfg.patch_dim, cfg.codebook_dim, cfg.codebook_size, cfg.num_codebooks,
                                      seed=seed, norm=rpq_norm)
    specs = [(name, truncate_to_patches(frontend(w[None].float()))) for name, w in clip_source(paths, seconds, max_clips)]
    if not specs:
        raise ValueError("no readable audio of at least 0.586 s among the inputs")
    if q.norm == "bin" and float(q.bin_count) == 0:  # a fresh quantizer: statistics of these clips
        q.fit_bin_stats(s[0] for _, s in specs)
    rows, per_band = [], [[] for _ in range(cfg.freq_patches)]
    for _, spec in specs:
        codes = q.codes(spec)[:, 0]  # [8 * W], token f * W + t
        rows.append(codes)
        for f, band in enumerate(codes.reshape(cfg.freq_patches, -1)):
            per_band[f].append(band)
    k = cfg.codebook_size
    res = {"clips": len(specs), "rpq_norm": q.norm, "overall": usage(torch.cat(rows), k),
           "bands": [usage(torch.cat(b), k) for b in per_band]}
    if plot:
        _plot(torch.cat(rows), k, plot, f"{len(specs)} clips, rpq_norm={q.norm}")
        res["plot"] = plot
    return res


def _plot(codes: torch.Tensor, k: int, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = torch.bincount(codes.long(), minlength=k).double()
    share = (counts / counts.sum()).sort(descending=True).values
    used = int((share > 0).sum())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(1, used + 1), share[:used].numpy(), width=1.0, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("code rank")
    ax.set_ylabel("share of patches")
    ax.set_title(f"code usage: {used} of {k} codes ({title})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(res: dict) -> str:
    o = res["overall"]
    lines = [f"{res['clips']} clips, {o['patches']} patches, rpq_norm={res['rpq_norm']}: {o['codes_used']} codes used, "
             f"perplexity {o['perplexity']:.1f}, top code {100 * o['top_share']:.1f}% of patches",
             "band (mel bins) | codes used | perplexity | top share"]
    for f, b in enumerate(res["bands"]):
        lines.append(f"{f} ({16 * f}-{16 * f + 15}) | {b['codes_used']} | {b['perplexity']:.1f} | {100 * b['top_share']:.1f}%")
    if res.get("plot"):
        lines.append(f"histogram: {res['plot']}")
    return "\n".join(lines)
