"""Pretraining loop, readable top to bottom.

Data: clip i of the corpus for step s and batch slot j is i = s * batch + j, so the stream is a pure
function of the step and a resumed run sees the same clips. Masks come from a torch Generator
seeded from the run seed, saved in checkpoints.
Writes OUT/metrics.csv (one row per step), OUT/checkpoint.pt (model, optimizer, scheduler, RNG,
step, configs; tensors and plain types only, so ``torch.load(weights_only=True)`` reads it) and
OUT/encoder/ (``BestRQ2Encoder.from_pretrained``).
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import BestRQ2Config
from .flops import pretrain_step_flops
from .model import BestRQ2


@dataclass
class TrainConfig:
    preset: str = "tiny"
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_pct: float = 0.05
    final_lr_ratio: float = 1e-3
    grad_clip: float = 0.0  # 0 = off
    seed: int = 0
    out: str = "runs/demo"
    data: str | None = None  # a folder of audio; None = the procedural corpus
    seconds: float = 10.0
    ckpt_every: int = 100
    num_workers: int = 1
    device: str = "auto"
    progress: bool = True

    def validate(self) -> None:
        for name in ("steps", "batch_size", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if not (self.lr > 0):
            raise ValueError(f"--lr must be > 0 (got {self.lr})")
        if not (0 <= self.warmup_pct < 1):
            raise ValueError(f"--warmup-pct must lie in [0, 1) (got {self.warmup_pct})")
        if self.seconds * 16000 < 9375:
            raise ValueError(f"--seconds {self.seconds} is shorter than one patch (0.586 s)")


def lr_factor(step: int, total: int, warmup_pct: float, final_ratio: float) -> float:
    """Linear warm-up over warmup_pct of the steps, then cosine from 1 to final_ratio."""
    warm = int(total * warmup_pct)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class StepBatches(torch.utils.data.Dataset):
    """Item s = the whole batch of step s (clips s * B ... s * B + B - 1), so workers stay in order."""

    def __init__(self, source, batch_size: int) -> None:
        self.source, self.batch_size = source, batch_size

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, step: int):
        items = [self.source[(step * self.batch_size + j) % len(self.source)] for j in range(self.batch_size)]
        return torch.stack([w for w, _ in items]), torch.tensor([n for _, n in items])


def make_source(tc: TrainConfig):
    from .data import AudioFolder, SyntheticCorpus

    if tc.data:
        return AudioFolder(tc.data, seconds=tc.seconds, seed=tc.seed)
    return SyntheticCorpus(seed=tc.seed, seconds=tc.seconds)


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write a temporary file, fsync, rename over the old one."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def pretrain(tc: TrainConfig, model_cfg: BestRQ2Config | None = None, resume: bool = False,
             stop_after: int | None = None) -> dict:
    """Train (or continue, ``resume``) up to ``tc.steps``; ``stop_after`` ends this call early after that
    many steps with a checkpoint, as an interruption would. Returns the losses of this call."""
    tc.validate()
    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if tc.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if tc.device == "auto" else tc.device))
    torch.manual_seed(tc.seed)
    cfg = model_cfg or BestRQ2Config.preset(tc.preset, seed=tc.seed)
    model = BestRQ2(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, tc.steps, tc.warmup_pct, tc.final_lr_ratio))
    mask_gen = torch.Generator().manual_seed(tc.seed + 1)
    start = 0
    ckpt_path = out / "checkpoint.pt"
    if resume:
        if not ckpt_path.is_file():
            raise ValueError(f"--resume: no checkpoint.pt in {out}")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        mask_gen.set_state(state["mask_rng"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])

    source = make_source(tc)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(StepBatches(source, tc.batch_size), range(start, tc.steps)),
        batch_size=None, num_workers=tc.num_workers, prefetch_factor=4 if tc.num_workers else None,
        generator=torch.Generator().manual_seed(tc.seed))  # its own seed draw must not move the global RNG

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "mask_rng": mask_gen.get_state(), "torch_rng": torch.get_rng_state(), "step": step,
            "model_config": cfg.to_dict(), "train_config": dataclasses.asdict(tc)})
        model.to_encoder().save_pretrained(out / "encoder")

    flops = pretrain_step_flops(cfg, tc.batch_size, 128, 64)
    peak = _peak_flops(device)
    from tqdm.auto import tqdm

    bar = tqdm(total=tc.steps, initial=start, disable=not tc.progress, desc="pretrain", unit="step")
    new_file = start == 0 or not (out / "metrics.csv").exists()
    log_f = open(out / "metrics.csv", "w" if new_file else "a", newline="")
    writer = csv.writer(log_f)
    if new_file:
        writer.writerow(["step", "loss", "accuracy", "lr", "clips_per_s", "mfu"])
    model.train()
    losses = []
    try:
        t_last = time.perf_counter()
        for step, (wave, lengths) in zip(range(start, tc.steps), loader):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                res = model(wave.to(device), lengths, generator=mask_gen)
            opt.zero_grad(set_to_none=True)
            res.loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            sched.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            cps = tc.batch_size / dt
            mfu = flops / dt / peak if peak else float("nan")
            loss = res.loss.item()
            losses.append(loss)
            writer.writerow([step + 1, f"{loss:.6f}", f"{float(res.accuracy):.4f}",
                             f"{sched.get_last_lr()[0]:.3e}", f"{cps:.2f}", f"{mfu:.4f}"])
            post = dict(loss=f"{loss:.3f}", acc=f"{float(res.accuracy):.3f}", clips_s=f"{cps:.1f}")
            if peak:
                post["mfu"] = f"{100 * mfu:.1f}%"
            bar.set_postfix(post)
            bar.update(1)
            if stop_after is not None and len(losses) >= stop_after:
                break
            if (step + 1) % tc.ckpt_every == 0 and step + 1 < tc.steps:
                log_f.flush()
                checkpoint(step + 1)
        log_f.flush()
        checkpoint(start + len(losses))
    except KeyboardInterrupt:
        bar.write("interrupted: saving a checkpoint")
        checkpoint(start + len(losses))
        raise
    finally:
        bar.close()
        log_f.close()
    return {"losses": losses, "out": str(out), "model_config": cfg}


def _peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of known cards, for MFU; None on CPU or unknown cards."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("4090", 165e12)):
        if key in name:
            return peak
    return None
