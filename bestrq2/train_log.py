"""What a training run writes as it goes: OUT/metrics.csv (one row per optimizer step), TensorBoard
events under OUT/tb (when tensorboard is installed), the progress bar, and OUT/loss.png at the end.

Steps are logged from their device stats ``[loss, accuracy, stop flag, code perplexity, codes used]``,
read ``lag`` steps late: on CUDA a step's stats are read once the two steps after it are queued, so the
host never waits for the device inside a step, and a hiccup on the host (a slow batch, the garbage
collector, a log write) shorter than a step leaves the card a whole queued step to run meanwhile (at one
step late the queue can run dry whenever queueing a step takes longer than running one).
"""
from __future__ import annotations

import collections
import csv
import math
import time
from pathlib import Path

import torch


class StopTraining(Exception):
    """Ends the loop: a signal, or too many non-finite losses in a row."""


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of known cards, for MFU; None on CPU or unknown cards."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("4090", 165e12)):
        if key in name:
            return peak
    return None


class MetricsLog:
    """metrics.csv, TensorBoard and the progress bar of one run (the rank-0 process writes files).

    ``push(step, stats, lr)`` queues a launched step; steps older than ``lag`` are read and logged.
    Returns True when the run must stop (a signal here, or on any rank: the flag in the reduced stats).
    """

    HEADER = ["step", "loss", "accuracy", "lr", "clips_per_s", "mfu", "bad_steps", "skipped_files",
              "code_perplexity", "codes_used"]

    def __init__(self, out: Path, start: int, total: int, batch_size: int, step_flops: float,
                 device: torch.device, main: bool, world: int, progress: bool, max_bad_steps: int,
                 source, stop_request: list) -> None:
        from tqdm.auto import tqdm

        self.out, self.batch_size, self.flops, self.main, self.world = out, batch_size, step_flops, main, world
        self.max_bad_steps, self.source, self.stop_request = max_bad_steps, source, stop_request
        self.peak = peak_flops(device)
        self.lag = 2 if device.type == "cuda" else 0  # CPU: read at once, there is no queue to keep full
        self.pending: collections.deque = collections.deque()  # (step, stats, lr)
        self.losses: list[float] = []
        self.bad_total = self.bad_run = 0
        self.t_last = time.perf_counter()
        self.bar = tqdm(total=total, initial=start, disable=not (progress and main), desc="pretrain", unit="step")
        self.file = self.writer = self.tb = None
        if main:
            self._open(start)

    def _open(self, start: int) -> None:
        path = self.out / "metrics.csv"
        new_file = start == 0 or not path.exists()
        if not new_file:  # a crash after the checkpoint logged steps that will now run again: drop them
            with open(path, newline="") as f:
                kept = [r for i, r in enumerate(csv.reader(f)) if i == 0 or (r and int(r[0]) <= start)]
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows(kept)
        self.file = open(path, "w" if new_file else "a", newline="")
        self.writer = csv.writer(self.file)
        if new_file:
            self.writer.writerow(self.HEADER)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tb"))
        except ImportError:
            self.tb = None

    @property
    def skipped(self) -> int:
        return len(getattr(self.source, "skipped", {}))

    def push(self, step: int, stats: torch.Tensor, lr: float) -> bool:
        self.pending.append((step, stats, lr))
        stop = False
        while len(self.pending) > self.lag:
            stop = self._read_oldest() or stop
        return stop

    def drain(self) -> bool:
        """Log every launched step (reads the device); True when the run must stop."""
        stop = False
        while self.pending:
            stop = self._read_oldest() or stop
        return stop

    def _read_oldest(self) -> bool:
        step, stats, lr = self.pending.popleft()
        loss, acc, flag, ppl, used = stats.tolist()
        now = time.perf_counter()
        dt, self.t_last = now - self.t_last, now
        cps = self.batch_size / dt
        mfu = self.flops / dt / self.peak if self.peak else float("nan")
        if not math.isfinite(loss):  # its update was skipped; a run of them stops the job
            self.bad_total += 1
            self.bad_run += 1
            self.bar.write(f"step {step + 1}: non-finite loss ({loss}); update skipped ({self.bad_run} in a row)")
        else:
            self.bad_run = 0
        self.losses.append(loss)
        if self.main:
            self.writer.writerow([step + 1, f"{loss:.6f}", f"{acc:.4f}", f"{lr:.3e}", f"{cps:.2f}", f"{mfu:.4f}",
                                  self.bad_total, self.skipped, f"{ppl:.2f}", int(used)])
            if self.tb is not None:
                for name, v in (("loss", loss), ("accuracy", acc), ("lr", lr), ("targets/code_perplexity", ppl),
                                ("targets/codes_used", used)):
                    self.tb.add_scalar(name, v, step + 1)
        post = dict(loss=f"{loss:.3f}", acc=f"{acc:.3f}", clips_s=f"{cps:.1f}", ppl=f"{ppl:.0f}", codes=int(used))
        if self.peak:
            post["mfu"] = f"{100 * mfu:.1f}%"
        if self.skipped:
            post["skipped_files"] = self.skipped
        self.bar.set_postfix(post)
        self.bar.update(1)
        if self.bad_run >= self.max_bad_steps:
            raise StopTraining(f"{self.bad_run} non-finite losses in a row")
        # every rank stops at the same step when any was signalled (the flag is in the reduced stats)
        return flag > 0 if self.world > 1 else bool(self.stop_request)

    def flush(self) -> None:
        if self.file:
            self.file.flush()

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.main:
            plot_losses(self.out)


def plot_losses(out: Path) -> None:
    """OUT/loss.png from metrics.csv (skipped quietly when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    pts = [(int(r["step"]), float(r["loss"])) for r in rows if math.isfinite(float(r["loss"]))]
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in pts], [v for _, v in pts], lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("masked-code cross-entropy")
    ax.set_title(f"{out.name}: pretraining loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
