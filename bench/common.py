"""Timing, bounds, memory and result rows shared by the benchmarks."""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
COLUMNS = ["op", "provider", "mode", "shape", "metric", "value", "device", "versions", "commit", "date", "command"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from bestrq2.precision import cpu_bf16_units

    units = cpu_bf16_units()
    caps = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")()
    return f"{name} ({torch.get_num_threads()} threads; ATen {caps}; bf16 units: {units or 'none'})"


def versions() -> str:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
    for name in ("flash_attn", "onnxruntime"):  # optional: recorded where installed
        try:
            v[name] = __import__(name).__version__
        except ImportError:
            pass
    return json.dumps(v, separators=(",", ":"))


def commit() -> str:
    """The measured code's commit: ``BESTRQ2_COMMIT`` if set (the device machine's copy of .git can lag
    the working tree it was sent, as on 2026-11-26), else git's HEAD."""

    from bestrq2.env import read

    if read("BESTRQ2_COMMIT"):
        return read("BESTRQ2_COMMIT")
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class Recorder:
    """Collects result rows and appends them to bench/results/<suite>.csv."""

    suite: str
    device: torch.device
    rows: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.meta = dict(device=device_name(self.device), versions=versions(), commit=commit(),
                         date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                         command=" ".join(["python", "-m", "bench"] + sys.argv[1:]))

    def add(self, op: str, provider: str, mode: str, shape: str, metric: str, value: float) -> None:
        self.rows.append(dict(op=op, provider=provider, mode=mode, shape=shape, metric=metric,
                              value=f"{value:.6g}", **self.meta))

    def write(self, path: Path | None = None) -> Path:
        path = path or RESULTS / f"{self.suite}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerows(self.rows)
        return path


def time_fn(fn, device: torch.device, reps: int = 20, warmup: int = 3) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds. CUDA: events via triton.testing.do_bench, which flushes
    L2 between runs. CPU: wall clock around each call."""
    if device.type == "cuda":
        from triton.testing import do_bench

        q = do_bench(fn, warmup=25, rep=max(50, reps * 5), quantiles=[0.5, 0.2, 0.8])
        return float(q[0]), float(q[1]), float(q[2])
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    pick = lambda p: ts[min(len(ts) - 1, int(p * (len(ts) - 1) + 0.5))]  # noqa: E731
    return statistics.median(ts), pick(0.2), pick(0.8)


def time_graph(fn) -> float | None:
    """Median ms of ``fn`` replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``): the
    kernels without the host's dispatch and launch costs. None when ``fn`` cannot be captured (a host
    sync inside, say), with the reason printed."""
    try:
        from triton.testing import do_bench_cudagraph

        return float(do_bench_cudagraph(fn, rep=50, quantiles=[0.5])[0] if _takes_quantiles() else
                     do_bench_cudagraph(fn, rep=50))
    except Exception as err:  # capture refused: report eager only
        print(f"    (no CUDA-graph timing: {type(err).__name__}: {str(err).splitlines()[0][:120]})")
        torch.cuda.synchronize()
        return None


def _takes_quantiles() -> bool:
    import inspect

    from triton.testing import do_bench_cudagraph

    return "quantiles" in inspect.signature(do_bench_cudagraph).parameters


def measure_bounds(device: torch.device, smoke: bool = False) -> dict[str, float]:
    """The card's ceilings measured in this run: a large copy (GB/s, read + write) and a large matmul
    (TFLOP/s; bf16 on CUDA, float32 on CPU where bf16 matmul is not the fast path)."""
    if device.type == "cuda":
        n_bytes, mm, dt = (64 << 20, 2048, torch.bfloat16) if smoke else (1 << 30, 8192, torch.bfloat16)
    else:
        n_bytes, mm, dt = (16 << 20, 256, torch.float32) if smoke else (256 << 20, 1536, torch.float32)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t_copy, _, _ = time_fn(lambda: dst.copy_(src), device, reps=5 if smoke else 20)
    a = torch.randn(mm, mm, device=device, dtype=dt)
    b = torch.randn(mm, mm, device=device, dtype=dt)
    t_mm, _, _ = time_fn(lambda: a @ b, device, reps=3 if smoke else 10)
    return {"copy_gbps": 2 * n_bytes / t_copy / 1e6, "matmul_tflops": 2 * mm ** 3 / t_mm / 1e9,
            "matmul_dtype": str(dt).replace("torch.", "")}


class CudaPeak:
    """Peak extra CUDA memory (bytes) allocated inside the block, above what was live on entry."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        return False


def cpu_peak_in_subprocess(module_args: list[str]) -> dict:
    """Run ``python -m bench.memprobe ARGS`` in a fresh process; it reports the peak RSS growth of the
    measured call (large CPU tensors are mmap'ed and returned to the OS when freed)."""
    out = subprocess.run([sys.executable, "-m", "bench.memprobe", *module_args], capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent, timeout=900,
                         env={**os.environ, "BESTRQ2_KERNELS": "reference"})
    if out.returncode:
        raise RuntimeError(f"memprobe {module_args} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def with_env(name: str, value: str, fn, *args, **kwargs):
    """fn(*args, **kwargs) with the environment variable ``name`` set to ``value`` for the call."""
    from bestrq2.env import overridden

    with overridden(name, value):
        return fn(*args, **kwargs)
