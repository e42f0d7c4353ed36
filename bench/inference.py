"""Encoder inference throughput: clips/s and ms per 10 s clip at batch 1 and 8 (and 64 on CUDA).

eager: the authors' formulation (attention scores written out, float32, plain ``F.linear``). fast: SDPA in
``torch.inference_mode`` with the linears on oneDNN-prepacked float32 weights (CPU), plus bf16 and the best attention backend on CUDA; on CUDA also
cuda_graph (fast replayed from a captured CUDA graph). On CPU also bf16 (where the CPU has AMX /
AVX512-BF16) and onnxruntime. On CPU the providers are timed
alternately (one run each per round) so that a shared machine's drift hits all alike. All run the
same weights; the max abs / relative difference of their frames to eager's is recorded.
"""
from __future__ import annotations

import statistics
import time

import torch

from bestrq2 import BestRQ2Config, BestRQ2Encoder

from .common import Recorder, time_fn


def _quantiles(ms: list[float]) -> tuple[float, float, float]:
    v = sorted(ms)
    pick = lambda p: v[min(len(v) - 1, int(p * (len(v) - 1) + 0.5))]  # noqa: E731
    return statistics.median(v), pick(0.2), pick(0.8)


def bench_inference(rec: Recorder, device, smoke: bool, preset: str | None = None, with_onnx: bool = True) -> None:
    """Providers: eager (the authors' formulation, fp32), fast (SDPA; bf16 autocast on CUDA), and on CPU
    bf16 (``precision="bf16"``, where the CPU has AMX / AVX512-BF16) and onnxruntime (the exported
    encoder, where onnxruntime is installed). CPU providers are timed interleaved, one run each per
    round. Every provider's frames are compared with eager's (max abs and relative difference)."""
    from bestrq2.precision import cpu_bf16_units

    preset = preset or ("tiny" if smoke else "base")
    batches = [1, 2] if smoke else ([1, 8, 64] if device.type == "cuda" else [1, 8])
    torch.manual_seed(0)
    eager = BestRQ2Encoder(BestRQ2Config.preset(preset, kernels={"attention": "math"})).to(device).eval()
    eager.prepack_cpu_weights = False  # the plain F.linear path (fast, bf16: oneDNN-prepacked weights on CPU)
    on_cuda = device.type == "cuda"
    # the encoder's own precision switch (an outer autocast would be undone by its fp32 setting)
    fast = BestRQ2Encoder(BestRQ2Config.preset(preset), precision="bf16" if on_cuda else "fp32",
                          cuda_graphs="off").to(device).eval()
    fast.load_state_dict(eager.state_dict())
    runners = {}

    def run_eager(wave):
        with torch.no_grad():
            return eager(wave)

    def run_fast(wave):
        with torch.inference_mode():
            return fast(wave)

    runners["eager"], runners["fast"] = run_eager, run_fast
    if on_cuda:  # the fast encoder replayed from a captured CUDA graph (bestrq2.cuda_graphs), every batch
        graph = BestRQ2Encoder(fast.config, precision="bf16", cuda_graphs="on").to(device).eval()
        graph.load_state_dict(eager.state_dict())

        def run_graph(wave):
            with torch.inference_mode():
                return graph(wave)

        runners["cuda_graph"] = run_graph
    if device.type == "cpu" and cpu_bf16_units():
        bf16 = BestRQ2Encoder(fast.config, precision="bf16").eval()
        bf16.load_state_dict(eager.state_dict())

        def run_bf16(wave):
            with torch.inference_mode():
                return bf16(wave)

        runners["bf16"] = run_bf16
    if device.type == "cpu" and with_onnx:
        try:
            import tempfile

            from bestrq2.onnx import OnnxEncoder

            tmp = tempfile.mkdtemp()
            # the default export (onnxruntime's fused contrib ops) and the portable one (standard ops only)
            for name, portable in (("onnxruntime", False), ("onnxruntime_portable", True)):
                ort = OnnxEncoder(fast.to_onnx(f"{tmp}/{name}.onnx", portable=portable),
                                  threads=torch.get_num_threads())
                runners[name] = lambda wave, ort=ort: torch.from_numpy(ort(wave.numpy()))
        except ImportError as err:
            print(f"  (no onnxruntime row: {err})")
    for b in batches:
        wave = torch.randn(b, 160_000, device=device) * 0.1
        shape = f"preset={preset},B={b},10s"
        ref = run_eager(wave).float()
        diffs = {name: (fn(wave).float() - ref).abs().max().item() for name, fn in runners.items() if name != "eager"}
        reps = 1 if smoke else (3 if (b > 1 and device.type == "cpu") else 10)
        if device.type == "cuda":
            stats = {name: time_fn(lambda fn=fn: fn(wave), device, reps=reps, warmup=1) for name, fn in runners.items()}
        else:  # interleave on CPU so drifts of a shared machine hit every provider alike
            runs = {name: [] for name in runners}
            for _ in range(reps):
                for name, fn in runners.items():
                    t0 = time.perf_counter()
                    fn(wave)
                    runs[name].append(1e3 * (time.perf_counter() - t0))
            stats = {k: _quantiles(v) for k, v in runs.items()}
        t = {}
        for name in runners:
            med, p20, p80 = stats[name]
            t[name] = med
            rec.add("encoder_inference", name, "forward", shape, "time_ms", med)
            rec.add("encoder_inference", name, "forward", shape, "time_p20_ms", p20)
            rec.add("encoder_inference", name, "forward", shape, "time_p80_ms", p80)
            rec.add("encoder_inference", name, "forward", shape, "clips_per_s", 1e3 * b / med)
            rec.add("encoder_inference", name, "forward", shape, "ms_per_clip", med / b)
            if name != "eager":
                rec.add("encoder_inference", name, "forward", shape, "speedup_vs_eager", t["eager"] / med)
                rec.add("encoder_inference", name, "forward", shape, "max_abs_diff_vs_eager", diffs[name])
                rec.add("encoder_inference", name, "forward", shape, "max_rel_diff_vs_eager",
                        diffs[name] / max(float(ref.abs().max()), 1e-30))
        print(f"  encoder B={b}: " + ", ".join(f"{n} {t[n]:.1f} ms ({t['eager'] / t[n]:.2f}x"
                                                 + (f", |diff| {diffs[n]:.1e})" if n in diffs else ")") for n in runners))
