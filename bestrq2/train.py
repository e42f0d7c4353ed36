"""Pretraining loop, readable top to bottom.

Data: the clips of step s are s * B ... s * B + B - 1 of the corpus (B the global batch); with N
processes, rank r takes its contiguous B / N of them. The stream is a pure function of the step, so a
resumed run sees the same clips. Masks are drawn for the global batch from a generator seeded by the
run seed (the same on every rank) and sliced per rank, so a 2-process run trains on exactly what a
1-process run with the same global batch does.

Writes OUT/metrics.csv (one row per optimizer step), OUT/checkpoints/ckpt-<step>.pt (model, optimizer,
scheduler, every RNG state, step, configs; tensors and plain types only, read with
``torch.load(weights_only=True)``; the last ``keep`` kept), OUT/encoder/ (``BestRQ2Encoder``),
OUT/loss.png at the end, and TensorBoard events under OUT/tb when tensorboard is installed.
Checkpoints hold unsharded (full) state dicts keyed by parameter name, so they move between world
sizes, DDP and FSDP2.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .config import MIN_SAMPLES, SAMPLE_RATE, BestRQ2Config
from .env import inductor_cache_per_isa, read
from .flops import pretrain_step_flops
from .frontend import num_time_patches
from .masking import sample_mask
from .checkpoints import (full_state, latest_checkpoint, list_checkpoints, load_state, move_aside, run_contents,
                          save_checkpoint)
from .model import IGNORE, BestRQ2
from .train_log import MetricsLog, StopTraining
from .precision import PRECISIONS


@dataclass
class TrainConfig:
    preset: str = "tiny"
    steps: int = 300
    batch_size: int = 8  # global batch (all processes, all accumulation micro-steps)
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_pct: float = 0.05
    final_lr_ratio: float = 1e-3
    grad_clip: float = 0.0  # 0 = off
    seed: int = 0
    out: str = "runs/demo"
    data: str | None = None  # a folder of audio, or a prepared corpus (index.json); None = procedural
    seconds: float = 10.0
    ckpt_every: int = 100
    keep: int = 3
    num_workers: int | None = None  # loader processes per rank; None: 1 on CPU, on CUDA see loader_workers
    device: str = "auto"
    compile: bool = False
    fsdp: bool = False
    max_bad_steps: int = 5  # consecutive non-finite losses before training stops
    progress: bool = True
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; fp32; bf16 (CPUs with AMX run it fast)
    overwrite: bool = False  # a fresh run in a folder holding one: move the old run aside first
    extend: bool = False  # resume with another --steps: continue the cosine to the new total (LRSchedule)

    def validate(self, world: int = 1) -> None:
        for name in ("steps", "batch_size", "ckpt_every", "keep", "grad_accum", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if not (self.lr > 0) or not math.isfinite(self.lr):
            raise ValueError(f"--lr must be a positive number (got {self.lr})")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0 (got {self.weight_decay})")
        if not (0 <= self.warmup_pct < 1):
            raise ValueError(f"--warmup-pct must lie in [0, 1) (got {self.warmup_pct})")
        if self.seconds * SAMPLE_RATE < MIN_SAMPLES:
            raise ValueError(f"--seconds {self.seconds} is shorter than one patch (0.586 s)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be auto, fp32 or bf16 (got {self.precision!r})")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0 (got {self.num_workers})")
        if self.batch_size % (world * self.grad_accum):
            raise ValueError(f"--batch-size {self.batch_size} must be divisible by processes x --grad-accum "
                             f"= {world} x {self.grad_accum}")


@dataclass
class LRSchedule:
    """Learning-rate factor of optimizer step s (0-based): linear warm-up over ``warmup`` steps, then a
    cosine from ``anchor_factor`` at ``anchor_step`` down to ``final_ratio`` at ``total``.

    A fresh run anchors the cosine at the end of the warm-up (factor 1). Extending a run that has done
    ``s0`` steps to a new total (``--resume --extend``) keeps the steps done and re-anchors the cosine
    at (s0, f(s0)): the learning rate continues from where it is, without a jump, and reaches
    ``final_ratio`` at the new total. A run extended during its warm-up keeps the warm-up length (in
    steps) and runs the cosine over the new length. Stored in checkpoints as a plain dict."""

    total: int
    warmup: int
    final_ratio: float
    anchor_step: int
    anchor_factor: float = 1.0

    @classmethod
    def fresh(cls, total: int, warmup_pct: float, final_ratio: float) -> "LRSchedule":
        warm = int(total * warmup_pct)
        return cls(total, warm, final_ratio, warm, 1.0)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, max(0.0, (step - self.anchor_step) / max(1, self.total - self.anchor_step)))
        return self.final_ratio + (self.anchor_factor - self.final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def extended(self, done: int, total: int) -> "LRSchedule":
        """The schedule of a run that has done ``done`` steps, continued to ``total`` steps."""
        if total <= done:
            raise ValueError(f"--steps {total}: the run has already done {done} steps; give a larger total")
        if done <= self.warmup:
            return dataclasses.replace(self, total=total)
        return dataclasses.replace(self, total=total, anchor_step=done, anchor_factor=self(done))


def lr_factor(step: int, total: int, warmup_pct: float, final_ratio: float) -> float:
    """Linear warm-up over warmup_pct of the steps, then cosine from 1 to final_ratio."""
    return LRSchedule.fresh(total, warmup_pct, final_ratio)(step)


def _batch_tensor(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """An empty [rows, samples] batch; inside a DataLoader worker in shared memory from the start, so that
    handing it to the main process moves no bytes (a plain tensor is copied into shared memory there)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class StepBatches(torch.utils.data.Dataset):
    """Item s = this rank's share of step s: clips s * B + lo ... s * B + hi - 1, as (wave [hi - lo, T],
    true lengths int64 [hi - lo]).

    From a source that reads int16 (``read_pcm16``: prepared shards) the wave is int16 PCM, written row by
    row into one batch tensor: half the bytes of float32 through the loader, the pinning and the copy to
    the GPU, no conversion and no value check on the host (``BestRQ2.prepare`` scales it on the device,
    exactly). At 256 x 10 s a worker built a batch 4x as fast as stacking float32 clips (2-core Xeon).
    Other sources (the procedural corpus, audio folders) give float32 rows, written into the batch the same way."""

    def __init__(self, source, batch_size: int, lo: int, hi: int, pcm16: bool = True) -> None:
        self.source, self.batch_size, self.lo, self.hi = source, batch_size, lo, hi
        self.pcm16 = pcm16 and hasattr(source, "read_pcm16")  # False: float32 from any source (as before)

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, step: int):
        idx = [(step * self.batch_size + j) % len(self.source) for j in range(self.lo, self.hi)]
        if self.pcm16:
            wave = _batch_tensor((len(idx), int(self.source.seconds * SAMPLE_RATE)), torch.int16)
            rows = wave.numpy()
            lengths = [self.source.read_pcm16(i, rows[r]) for r, i in enumerate(idx)]
        else:
            items = [self.source[i] for i in idx]
            wave = _batch_tensor((len(idx), items[0][0].shape[-1]), torch.float32)
            torch.stack([w for w, _ in items], out=wave)
            lengths = [n for _, n in items]
        return wave, torch.tensor(lengths)


def loader_workers(tc: TrainConfig, device: torch.device, world: int) -> int:
    """``--num-workers``, or by default: 1 on a CPU (its cores run the model); on CUDA the cores this
    process may use (split over the ranks) minus one for the main thread, at most 8. One worker built
    about 2,300 clips/s of 10 s int16 batches from shards on a slow 2-core host (a DataLoader of one worker),
    and an H200 step may take 7,000 a second (issue #15)."""
    if tc.num_workers is not None:
        return tc.num_workers
    if device.type != "cuda":
        return 1
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(8, cores // max(1, world) - 1))


def make_source(tc: TrainConfig):
    from .data import AudioFolder, SyntheticCorpus
    from .data.shards import ShardedCorpus, is_prepared

    if not tc.data:
        return SyntheticCorpus(seed=tc.seed, seconds=tc.seconds)
    if is_prepared(tc.data):
        return ShardedCorpus(tc.data, seconds=tc.seconds, seed=tc.seed)
    return AudioFolder(tc.data, seconds=tc.seconds, seed=tc.seed)


def _check_fresh_out(out: Path, tc: TrainConfig, main: bool, world: int) -> None:
    """A fresh run never writes into a folder holding another run, unless ``--overwrite`` moved it aside."""
    held = run_contents(out) if out.is_dir() else []
    if held and not tc.overwrite:
        shown = ", ".join(held[:4]) + (" ..." if len(held) > 4 else "")
        raise ValueError(f"{out} already holds a run ({shown}). Continue it with --resume {out}, pick "
                         f"another --out, or pass --overwrite to move it aside to {out.name}.old-<time> "
                         "and start over")
    if held and main:
        print(f"--overwrite: moved the previous run to {move_aside(out)}", flush=True)
    if world > 1:
        dist.barrier()


def saved_schedule(state: dict, tc: TrainConfig) -> LRSchedule:
    """A checkpoint's schedule (for checkpoints written before schedules were stored: the fresh schedule
    of their own train config, ``tc``'s values where that lacks one)."""
    if state.get("schedule"):
        return LRSchedule(**state["schedule"])
    saved_tc = state.get("train_config", {})
    return LRSchedule.fresh(int(saved_tc.get("steps", tc.steps)), float(saved_tc.get("warmup_pct", tc.warmup_pct)),
                            float(saved_tc.get("final_lr_ratio", tc.final_lr_ratio)))


def run_total_steps(run: str | Path) -> int:
    """The total steps the run in ``run`` is scheduled for (its latest checkpoint's)."""
    state = torch.load(latest_checkpoint(run), map_location="cpu", weights_only=True, mmap=True)
    return saved_schedule(state, TrainConfig()).total


def _resumed_schedule(resumed: dict, tc: TrainConfig, path: Path) -> LRSchedule:
    """The checkpoint's schedule; another total only with ``--extend`` (see LRSchedule.extended)."""
    sched = saved_schedule(resumed, tc)
    if tc.steps == sched.total:
        return sched
    done = int(resumed["step"])
    if not tc.extend:
        raise ValueError(
            f"{path} belongs to a run of {sched.total} steps and --steps is {tc.steps}. Its learning rate "
            f"follows a cosine to step {sched.total}; recomputing it for {tc.steps} would make the learning "
            f"rate jump at step {done}. Pass --extend to continue the cosine from its current value "
            f"(factor {sched(done):.4g} at step {done}) to the new total without a jump, or drop --steps")
    return sched.extended(done, tc.steps)


# ------------------------------------------------------------------------------------ distributed
def process_rank() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) for a plain process."""
    return int(read("RANK", "0")), int(read("WORLD_SIZE", "1"))


def _dist_setup(tc: TrainConfig) -> tuple[int, int, torch.device]:
    rank, world = process_rank()
    use_cuda = torch.cuda.is_available() and tc.device in ("auto", "cuda")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(read("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu" if tc.device in ("auto", "cpu") else tc.device)


def _wrap(model: BestRQ2, tc: TrainConfig, world: int, device: torch.device):
    if tc.fsdp:
        if world < 2:
            raise ValueError("--fsdp needs several processes (launch with torchrun --nproc_per_node=N)")
        from torch.distributed.fsdp import fully_shard

        for stack in (model.encoder, model.predictor):
            if stack is not None:
                stack.fuse_blocks = False  # a block's fused last add reads the next block's (sharded) norm1
                for blk in stack.blocks:
                    fully_shard(blk)
        fully_shard(model)
        return model
    if world > 1:
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


# ------------------------------------------------------------------------------------ the loop
def _resumed_config(state: dict, given: BestRQ2Config | None, path: Path) -> BestRQ2Config:
    """The checkpoint's model config; a config passed for the resumed run must equal it (a model flag that
    differs would silently train another model, or fail deep inside load_state_dict). The kernels may
    differ (they compute the same model): the given ones run from here on, else the saved ones (with the
    environment's overrides, as at every build)."""
    saved = BestRQ2Config.from_dict(state["model_config"])
    if given is None:
        return saved
    a, b = saved.to_dict(), given.to_dict()
    diff = [f"{k}: checkpoint {a[k]!r}, now {b[k]!r}" for k in a if a[k] != b[k] and k != "kernels"]
    if diff:
        raise ValueError(f"resuming {path} with another model config ({'; '.join(diff)}); "
                         "resume with the flags the run started with, or drop the model flags")
    return dataclasses.replace(saved, kernels=given.kernels)


def make_optimizer(params, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused (one pass over each parameter's weights, moments and gradient, and a non-finite step
    skipped on the device) on CUDA and on CPUs: for ViT-B's 120 M parameters on the 2-core Xeon a step took
    87 ms against foreach's 476. Foreach where this torch has no fused AdamW for the device."""
    params = list(params)
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=True, foreach=False)
        except RuntimeError:  # a torch without the fused kernel for this device or dtype
            pass
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, foreach=True)


def keep_step_kind(opt: torch.optim.Optimizer) -> None:
    """After ``load_state_dict``: the fused / foreach choice of this machine's optimizer, not the checkpoint's.
    Loading restores each group's settings as saved, so a run saved before AdamW was fused on a CPU (or saved on
    a GPU and resumed on a CPU) would step another way than ``train_step`` expects."""
    for group in opt.param_groups:
        for flag in ("fused", "foreach"):
            if flag in opt.defaults:
                group[flag] = opt.defaults[flag]


def code_health(counts: torch.Tensor) -> torch.Tensor:
    """[perplexity, distinct codes] of a batch's targets from their counts [K] (on the device):
    perplexity = exp(entropy in nats) of the code frequencies; 1 when one code takes everything, K
    when all are equally used."""
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()
    return torch.stack([torch.exp(entropy), (counts > 0).sum().to(counts.dtype)])


@torch.no_grad()
def estimate_bin_stats(model: BestRQ2, source, clips: int = 64) -> int:
    """rpq_norm="bin": per-mel-bin mean and std of the log-mel over the corpus's first ``clips`` clips
    (each clip's true length only; float64 sums), frozen into the quantizer. Every process computes the
    same (the corpus is a pure function of the index). Returns the frame count."""
    device = model.head.weight.device

    def specs():
        for i in range(min(clips, len(source))):
            wave, length = source[i]
            length = max(int(length), model.config.min_samples)
            yield model.frontend(wave[None, :length].float().to(device))[0]  # [bins, frames]

    return model.quantizer.fit_bin_stats(specs())


def uses_bf16(tc: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast for the step: --precision bf16, or auto on CUDA."""
    return tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")


def train_step(model: BestRQ2, wrapped, forward, opt, tc: TrainConfig, wave: torch.Tensor, lengths: torch.Tensor,
               mask: torch.Tensor, device: torch.device, world: int, stop_flag: bool) -> torch.Tensor:
    """One optimizer step over this rank's share of the batch (``grad_accum`` micro-batches); host
    tensors in. Returns device stats [loss, accuracy, stop flag] of the global batch, unread: with a
    fused optimizer (CUDA, CPU) nothing here waits for the device (masks and indices go over from pinned
    memory, a non-finite loss skips the update through the optimizer's ``found_inf``)."""
    micro = wave.shape[0] // tc.grad_accum
    opt.zero_grad(set_to_none=True)
    loss_sum, acc_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    counts = torch.zeros(model.config.codebook_size, device=device)  # target health: codebook 0's usage
    for k in range(tc.grad_accum):
        sl = slice(k * micro, (k + 1) * micro)
        sync = k == tc.grad_accum - 1 or not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
        ctx = wrapped.no_sync() if not sync else contextlib.nullcontext()
        batch = model.prepare(wave[sl], lengths[sl], mask[sl])  # host checks, non-blocking copies
        with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(tc, device)):
            res = forward(batch)  # the frontend and the quantizer switch autocast off: fp32 targets
        (res.loss / tc.grad_accum).backward()
        loss_sum += res.loss.detach() / tc.grad_accum
        acc_sum += res.accuracy.detach() / tc.grad_accum
        t = res.targets[..., 0].reshape(-1)
        counts.scatter_add_(0, t.clamp_min(0), (t != IGNORE).float())  # no boolean indexing: no sync
    # the flag made on the device (a fill): torch.tensor(x, device=cuda) copies from pageable memory and
    # waits for the whole queue, one host sync a step
    flag = torch.full((), float(stop_flag), device=device)
    stats = torch.cat([torch.stack([loss_sum, acc_sum, flag]), counts])
    if world > 1:  # one all-reduce: loss, accuracy, whether any rank must stop, and the code counts
        dist.all_reduce(stats)
        stats[:2] /= world
    stats = torch.cat([stats[:3], code_health(stats[3:])])
    if opt.param_groups[0].get("fused"):  # (what the step runs: a group's flag, not the constructor's)
        opt.found_inf = (~torch.isfinite(stats[0])).float()  # the fused step leaves everything as it was
        opt.grad_scale = None
    elif not math.isfinite(float(stats[0])):  # foreach (no fused kernel here): read the loss, skip on the host
        opt.zero_grad(set_to_none=True)
        return stats
    if tc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    opt.step()
    return stats


@dataclass
class Run:
    """What a training run holds between steps (``setup_run``)."""

    tc: TrainConfig
    model: BestRQ2
    wrapped: torch.nn.Module  # DDP / FSDP around the model, or the model
    forward: object  # ``wrapped``, compiled with --compile
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    schedule: LRSchedule
    mask_gen: torch.Generator  # masks of the global batch: the same stream on every rank
    source: object  # the corpus
    loader: torch.utils.data.DataLoader  # this rank's share of steps start ... steps - 1
    start: int
    device: torch.device
    rank: int
    world: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def out(self) -> Path:
        return Path(self.tc.out)

    @property
    def num_tokens(self) -> int:
        return self.model.config.freq_patches * num_time_patches(int(self.tc.seconds * SAMPLE_RATE))

    def masks(self) -> torch.Tensor:
        """The next step's masks, this rank's rows of the global batch's."""
        cfg, local = self.model.config, self.tc.batch_size // self.world
        mask = sample_mask(self.tc.batch_size, self.num_tokens, (cfg.mask_ratio_min, cfg.mask_ratio_max),
                           cfg.mask_mode, generator=self.mask_gen, equal_counts=cfg.mask_equal_counts)
        return mask[self.rank * local:(self.rank + 1) * local]


def setup_run(tc: TrainConfig, model_cfg: BestRQ2Config | None, resume: bool) -> Run:
    """Processes, the run folder, the model, optimizer and schedule (restored from the newest checkpoint
    with ``resume``), the corpus and the step loader."""
    rank, world, device = _dist_setup(tc)
    tc.validate(world)
    out = Path(tc.out)
    if not resume:
        _check_fresh_out(out, tc, rank == 0, world)
    if rank == 0:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tc.seed)
    resumed, start = None, 0
    schedule = LRSchedule.fresh(tc.steps, tc.warmup_pct, tc.final_lr_ratio)
    if resume:
        path = latest_checkpoint(out)
        resumed = torch.load(path, map_location="cpu", weights_only=True)
        start = int(resumed["step"])
        model_cfg = _resumed_config(resumed, model_cfg, path)
        schedule = _resumed_schedule(resumed, tc, path)
    model = BestRQ2(model_cfg or BestRQ2Config.preset(tc.preset, seed=tc.seed)).to(device)
    opt = make_optimizer(model.parameters(), tc, device)
    mask_gen = torch.Generator().manual_seed(tc.seed + 1)
    wrapped = _wrap(model, tc, world, device)
    if tc.fsdp:  # FSDP2 shards parameters in place: build the optimizer on the sharded ones
        opt = make_optimizer(model.parameters(), tc, device)
    # a lambda, not the schedule object: LambdaLR would save a callable object's fields and restore the
    # old ones over an extended schedule on load; the schedule is saved on its own
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s))
    if resumed is not None:
        load_state(model, opt, resumed["model"], resumed["optimizer"])
        keep_step_kind(opt)
        sched.load_state_dict(resumed["scheduler"])
        mask_gen.set_state(resumed["mask_rng"])
        torch.set_rng_state(resumed["torch_rng"])
        if device.type == "cuda" and resumed.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(resumed["cuda_rng"])
    source = make_source(tc)
    if model.config.rpq_norm == "bin" and float(model.quantizer.bin_count) == 0:  # fresh run: measure, freeze
        frames = estimate_bin_stats(model, source)
        if rank == 0:
            print(f"rpq_norm=bin: per-bin statistics from {frames} frames of the corpus's first clips", flush=True)
    local = tc.batch_size // world
    workers = loader_workers(tc, device, world)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(StepBatches(source, tc.batch_size, rank * local, (rank + 1) * local),
                                range(start, tc.steps)),
        # 4 batches ahead with one worker, 2 per worker with more (each 82 MB at 256 x 10 s int16, in shared
        # memory: 1.3 GB with 8 workers), so that many workers do not fill a container's /dev/shm
        batch_size=None, num_workers=workers, prefetch_factor=max(2, 4 // workers) if workers else None,
        pin_memory=device.type == "cuda",  # so the wave's copy to the device does not block
        generator=torch.Generator().manual_seed(tc.seed))  # its own seed draw must not move the global RNG
    if tc.compile:
        inductor_cache_per_isa()  # a narrowed ATen vector path must not reuse kernels built for a wider one
    forward = torch.compile(wrapped) if tc.compile else wrapped
    return Run(tc, model, wrapped, forward, opt, sched, schedule, mask_gen, source, loader, start, device, rank, world)


def write_checkpoint(run: Run, step: int) -> None:
    """OUT/checkpoints/ckpt-<step>.pt (model, optimizer, schedule, every RNG, configs; the last ``keep``
    kept) and OUT/encoder/ from it. Every rank takes part in gathering the state; rank 0 writes."""
    model_sd, optim_sd = full_state(run.wrapped if run.tc.fsdp else run.model, run.opt)
    if not run.main:
        return
    tc, out = run.tc, run.out
    save_checkpoint(out / "checkpoints" / f"ckpt-{step:08d}.pt", {
        "model": model_sd, "optimizer": optim_sd, "scheduler": run.sched.state_dict(),
        "mask_rng": run.mask_gen.get_state(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if run.device.type == "cuda" else None, "step": step,
        "model_config": run.model.config.to_dict(), "train_config": dataclasses.asdict(tc), "world_size": run.world,
        "schedule": dataclasses.asdict(run.schedule)})
    for old in list_checkpoints(out)[: -tc.keep]:
        old.unlink(missing_ok=True)
    with torch.random.fork_rng(devices=[]):
        copy = BestRQ2(run.model.config)
    copy.load_state_dict(model_sd)
    copy.to_encoder().save_pretrained(out / "encoder")


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM / first Ctrl-C append their name to the yielded list: the loop finishes the current step,
    saves and exits. A second Ctrl-C aborts at once. (Raising from the handler could land inside
    torch.save and tear the file being written.)"""
    requests: list[str] = []

    def on_signal(signum, frame):
        if signum == signal.SIGINT and requests:
            raise KeyboardInterrupt
        requests.append(signal.Signals(signum).name)

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requests
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def pretrain(tc: TrainConfig, model_cfg: BestRQ2Config | None = None, resume: bool = False,
             stop_after: int | None = None) -> dict:
    """Train (or continue, ``resume``) up to ``tc.steps``; ``stop_after`` ends this call early after that
    many steps with a checkpoint, as an interruption would. Returns the losses of this call."""
    run = setup_run(tc, model_cfg, resume)
    cfg = run.model.config
    flops = pretrain_step_flops(cfg, tc.batch_size, run.num_tokens, run.num_tokens // 2)
    stopped = None
    with stop_on_signals() as stop_request:
        log = MetricsLog(run.out, run.start, tc.steps, tc.batch_size, flops, run.device, run.main, run.world,
                         tc.progress, tc.max_bad_steps, run.source, stop_request)
        run.model.train()
        try:
            for step, (wave, lengths) in zip(range(run.start, tc.steps), run.loader):
                stats = train_step(run.model, run.wrapped, run.forward, run.opt, tc, wave, lengths, run.masks(),
                                   run.device, run.world, bool(stop_request))
                run.sched.step()
                if log.push(step, stats, run.sched.get_last_lr()[0]):
                    log.drain()
                    raise StopTraining(stop_request[0] if stop_request else "a signal to another rank")
                if stop_after is not None and step + 1 - run.start >= stop_after:
                    break
                if (step + 1) % tc.ckpt_every == 0 and step + 1 < tc.steps:
                    if log.drain():
                        raise StopTraining(stop_request[0] if stop_request else "a signal to another rank")
                    log.flush()
                    write_checkpoint(run, step + 1)
            log.drain()
            log.flush()
            write_checkpoint(run, run.start + len(log.losses))
        except (KeyboardInterrupt, StopTraining) as why:
            try:
                log.drain()  # the steps already launched are done: log them, the checkpoint holds their updates
            except StopTraining:
                pass
            done = run.start + len(log.losses)
            log.bar.write(f"stopping ({why or 'interrupted'}): saving a checkpoint at step {done}")
            log.flush()
            write_checkpoint(run, done)
            if isinstance(why, StopTraining) and "non-finite" in str(why):
                raise RuntimeError(f"training stopped: {why}; checkpoint saved at step {done} in {run.out}") from None
            if isinstance(why, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            stopped = str(why)
        finally:
            log.close()
            if run.world > 1 and dist.is_initialized():
                dist.barrier()
    result = {"losses": log.losses, "out": str(run.out), "model_config": cfg, "bad_steps": log.bad_total,
              "skipped_files": dict(getattr(run.source, "skipped", {})), "loader_workers": run.loader.num_workers}
    return result if stopped is None else {**result, "stopped": stopped}
