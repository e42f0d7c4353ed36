"""Run folders and checkpoints: atomic saves, finding the newest loadable one, unsharded state dicts that
move between world sizes and layouts, and the encoder export.

A checkpoint (``OUT/checkpoints/ckpt-<step>.pt``) holds tensors and plain types only and is read with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .config import BestRQ2Config
from .model import BestRQ2, upgrade_key


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write a temporary file, fsync it, rename it over the target, fsync the folder.
    A crash at any moment leaves either the old file set or the new one, never a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (its entry list reaches the disk)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))


def latest_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the newest loadable one in a run directory."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise ValueError(f"{p}: no such checkpoint file or run directory")
    for c in reversed(list_checkpoints(p)):
        try:
            torch.load(c, map_location="cpu", weights_only=True, mmap=True)
            return c
        except Exception:  # a truncated file from a crash before atomic saves existed: skip it
            continue
    raise ValueError(f"{p}: no loadable checkpoint under {p / 'checkpoints'}")


def export_encoder(ckpt: str | Path, out: str | Path) -> Path:
    """``bestrq2 export``: encoder-only config.json + model.safetensors from a checkpoint or run dir."""
    path = latest_checkpoint(ckpt)
    state = torch.load(path, map_location="cpu", weights_only=True)
    cfg = BestRQ2Config.from_dict(state["model_config"])
    model = BestRQ2(cfg)
    model.load_state_dict(state["model"])
    model.to_encoder().save_pretrained(out)
    return path


def run_contents(out: Path) -> list[str]:
    """What in ``out`` belongs to a training run (checkpoints, metrics, encoder); empty if none."""
    found = [str(c.relative_to(out)) for c in list_checkpoints(out)]
    found += [name for name in ("metrics.csv", "encoder") if (out / name).exists()]
    return found


def move_aside(out: Path) -> Path:
    """Rename the run folder ``out`` to ``out.old-<UTC time>`` (``-2``, ``-3`` ... if taken) and fsync
    the parent, as checkpoints are made durable: one rename, nothing deleted, never half moved."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = out.with_name(f"{out.name}.old-{stamp}")
    k = 2
    while dest.exists():
        dest = out.with_name(f"{out.name}.old-{stamp}-{k}")
        k += 1
    os.rename(out, dest)
    fsync_dir(out.parent)
    return dest


def full_state(model, opt) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts keyed by parameter name (portable across layouts)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    return get_state_dict(model, optimizers=opt, options=opts)


def load_state(model: BestRQ2, opt, model_sd: dict, optim_sd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    # checkpoints of earlier layouts name some weights differently (model.upgrade_key): the model's
    # and the optimizer's entries are renamed alike
    up = lambda k: upgrade_key(k, model.config.one_stage)  # noqa: E731
    model_sd = {up(k): v for k, v in model_sd.items()}
    optim_sd = {"state": {up(k): v for k, v in optim_sd["state"].items()},
                "param_groups": [{**g, "params": [up(k) for k in g["params"]]} for g in optim_sd["param_groups"]]}
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
