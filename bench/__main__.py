"""python -m bench --suite cpu|gpu [--smoke] [--device cpu|cuda] [--only OPS]

gpu: kernel microbenchmarks (fast vs reference vs torch.compile), attention backends at N in
     {64, 128, 256}, the fused head's memory and time, end-to-end pretraining (a)-(d), encoder
     inference; under 8 minutes on one H100. With --device cpu --smoke it runs the same code at tiny
     sizes under the Triton interpreter (an import/argument check, no meaningful times).
cpu: reference-path speed of the ops, attention backends, encoder inference (eager vs fast), the
     fused head's peak memory vs unfused (fresh processes), and pytest-benchmark for the data pipeline.
Rows are appended to bench/results/<suite>[-smoke].csv; render with ``python -m bench.report``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _exit_on_sigterm(signum, frame):
    raise SystemExit(f"bench: ended by signal {signum}")


def _names(text: str) -> list[str]:
    """A comma list of names (``--only``, ``--variants``), blanks dropped."""
    return [s.strip() for s in text.split(",") if s.strip()]


ONLY_KEYS = ("rpq", "gather", "head", "attention", "block", "frontend", "e2e", "inference", "memory", "pipeline")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", required=True, choices=["cpu", "gpu"])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds; checks that everything runs")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda for gpu, cpu for cpu")
    ap.add_argument("--only", default="", help="comma list: " + ",".join(ONLY_KEYS))
    ap.add_argument("--variants", default="", help="comma list of e2e variants (default all but b_plain_compile): a_eager_fp32, "
                    "b_bf16_sdpa, b_plain_compile (torch.compile of plain PyTorch), c_fast, d_fast_compile, e_pretrain_loop")
    ap.add_argument("--out", default=None, help="results CSV (default bench/results/<suite>[-smoke].csv)")
    args = ap.parse_args(argv)
    only = _names(args.only)
    chosen = _names(args.variants)  # e2e variants, in the order given
    # a misspelt piece would measure nothing and say nothing: on a lent GPU that is device time lost
    unknown = sorted(set(only) - set(ONLY_KEYS))
    if unknown:
        ap.error(f"--only: unknown {unknown}; known: {','.join(ONLY_KEYS)}")
    device_kind = args.device or ("cuda" if args.suite == "gpu" else "cpu")
    if device_kind == "cpu" and args.suite == "gpu":
        if not args.smoke:
            ap.error("--suite gpu on --device cpu runs only with --smoke (the Triton interpreter is no benchmark)")
        os.environ["TRITON_INTERPRET"] = "1"  # before bestrq2.kernels defines its kernels
    from .e2e import VARIANTS  # (imports bestrq2: after TRITON_INTERPRET is set)

    unknown = sorted(set(chosen) - {*VARIANTS, "e_pretrain_loop"})
    if unknown:
        ap.error(f"--variants: unknown {unknown}; known: {','.join(VARIANTS)},e_pretrain_loop")
    from bestrq2.env import inductor_cache_per_isa

    inductor_cache_per_isa()  # the compile rows under a narrowed ATEN_CPU_CAPABILITY get a cache of their own

    import torch

    from .common import Recorder, measure_bounds

    if device_kind == "cuda" and not torch.cuda.is_available():
        ap.error("--suite gpu needs CUDA (or --device cpu --smoke for an interpreter check)")
    device = torch.device(device_kind)
    want = lambda name: not only or name in only  # noqa: E731
    name = args.suite + ("-smoke" if args.smoke else "")
    rec = Recorder(name, device)
    t0 = time.time()
    with_fast = args.suite == "gpu"  # the Triton paths (named per call): on CUDA, or interpreted in the smoke check
    reps = 2 if args.smoke else (20 if device.type == "cuda" else 5)

    from . import ops

    ops.SMOKE["on"] = args.smoke

    # a piece that raises or that `timeout` ends (SIGTERM) still appends the rows it measured: the GPU
    # session runs the suite in pieces under timeouts, and (a)-(d) must not be lost to a failure in (e)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        print(f"bench {name} on {rec.meta['device']}  ({rec.meta['versions']})")
        bounds = measure_bounds(device, smoke=args.smoke)
        rec.add("bound", "copy", "forward", "", "gbps", bounds["copy_gbps"])
        rec.add("bound", f"matmul_{bounds['matmul_dtype']}", "forward", "", "tflops", bounds["matmul_tflops"])
        print(f"  bounds: copy {bounds['copy_gbps']:.1f} GB/s, {bounds['matmul_dtype']} matmul "
              f"{bounds['matmul_tflops']:.2f} TFLOP/s")
        steps = [("rpq", ops.bench_rpq), ("gather", ops.bench_gather_scatter), ("head", ops.bench_head),
                 ("attention", ops.bench_attention), ("block", ops.bench_block_ops),
                 ("frontend", ops.bench_frontend)]
        for key, fn in steps:
            if want(key):
                t = time.time()
                fn(rec, device, bounds, args.smoke, with_fast, reps)
                print(f"  {key}: {time.time() - t:.1f} s")
        if want("e2e") and args.suite == "gpu":
            from .e2e import bench_e2e

            bench_e2e(rec, device, bounds, args.smoke, variants=[v for v in chosen if v != "e_pretrain_loop"] or None,
                      with_loop=not chosen or "e_pretrain_loop" in chosen)
        if want("inference"):
            from .inference import bench_inference

            bench_inference(rec, device, args.smoke, with_onnx=args.suite == "cpu")
        if want("memory") and args.suite == "cpu":
            head_memory_cpu(rec, args.smoke)
        if want("pipeline") and args.suite == "cpu":
            pipeline(rec, args.smoke)
    finally:
        path = rec.write(Path(args.out) if args.out else None)
        print(f"{len(rec.rows)} rows -> {path}  ({time.time() - t0:.0f} s)", flush=True)
    return 0


def head_memory_cpu(rec, smoke: bool) -> None:
    """Peak extra memory of the head + CE, unfused vs chunked, each in a fresh process (RSS growth)."""
    from .common import cpu_peak_in_subprocess

    m, d, k = (2048, 64, 8192) if smoke else (16384, 768, 8192)
    shape = f"M={m},D={d},K={k},C=1,float32"
    res = {impl: cpu_peak_in_subprocess([impl, str(m), str(d), str(k)]) for impl in ("reference", "torch")}
    for impl, r in res.items():
        rec.add("linear_cross_entropy", "fused" if impl == "torch" else "reference", "full", shape,
                "peak_mem_bytes", r["peak_bytes"])
    ratio = res["torch"]["peak_bytes"] / max(1, res["reference"]["peak_bytes"])
    rec.add("linear_cross_entropy", "fused", "full", shape, "peak_mem_ratio_vs_reference", ratio)
    print(f"  head memory (CPU, {shape}): unfused {res['reference']['peak_bytes'] / 2**20:.0f} MiB, "
          f"chunked {res['torch']['peak_bytes'] / 2**20:.0f} MiB ({ratio:.2f}x); "
          f"losses {res['reference']['loss']:.6f} / {res['torch']['loss']:.6f}")


def pipeline(rec, smoke: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        js = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               str(Path(__file__).parent / "test_pipeline.py"), f"--benchmark-json={js}"]
        if smoke:
            cmd += ["--benchmark-min-rounds=1", "--benchmark-max-time=0.05", "--benchmark-warmup=off"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
        if out.returncode:
            raise RuntimeError(f"pipeline benchmarks failed:\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}")
        data = json.loads(js.read_text())
    per_call_clips = {"test_synthetic_clip": 1, "test_audio_folder_flac_16k": 1,
                      "test_audio_folder_wav_44k_stereo_resampled": 1, "test_logmel_frontend_batch8": 8,
                      "test_prepared_shards_crop": 1, "test_step_batch_shards_b64[int16]": 64,
                      "test_step_batch_shards_b64[float32]": 64, "test_check_wave_b64": 64}
    for b in data["benchmarks"]:
        med = b["stats"]["median"]
        rec.add("data_pipeline", b["name"].removeprefix("test_"), "forward", "10s clips, 1 thread", "time_ms", 1e3 * med)
        rec.add("data_pipeline", b["name"].removeprefix("test_"), "forward", "10s clips, 1 thread",
                "clips_per_s_per_core", per_call_clips.get(b["name"], 1) / med)
        print(f"  {b['name']:45s} {1e3 * med:8.2f} ms  ({per_call_clips.get(b['name'], 1) / med:.1f} clips/s/core)")


if __name__ == "__main__":
    sys.exit(main())
