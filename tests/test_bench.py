"""The benchmark commands keep working: the CPU suite's smoke mode, the GPU suite's code at tiny sizes
under the Triton interpreter, and the report renderer on their rows."""
import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


# modules the H200 machine lent on 2026-11-26 lacked (its env.txt): the GPU suite must run without them
GPU_MACHINE_LACKS = ("soundfile", "flash_attn")


def run_bench(args, tmp_path, without=()):
    """``python -m bench ARGS``; ``without``: modules made unimportable in that process (and its forks)."""
    out = tmp_path / "rows.csv"
    block = "; ".join(f"sys.modules[{m!r}] = None" for m in without)
    main = ["-c", f"import runpy, sys; {block}; runpy.run_module('bench', run_name='__main__', alter_sys=True)"] \
        if without else ["-m", "bench"]
    res = subprocess.run([sys.executable, *main, *args, "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return list(csv.DictReader(open(out))), res.stdout


@pytest.fixture(scope="module")
def cpu_smoke(tmp_path_factory):
    """One smoke run of the CPU suite, shared by the tests that read its rows."""
    d = tmp_path_factory.mktemp("cpu_smoke")
    rows, text = run_bench(["--suite", "cpu", "--smoke"], d)
    return rows, text, d / "rows.csv"


def test_cpu_suite_smoke(cpu_smoke):
    rows, text, _ = cpu_smoke
    ops = {r["op"] for r in rows}
    assert {"bound", "rpq_codes", "gather_tokens", "scatter_tokens", "linear_cross_entropy", "attention",
            "encoder_inference", "data_pipeline", "logmel_power"} <= ops
    fe = {r["metric"] for r in rows if r["op"] == "logmel_power" and r["provider"] == "fast"}
    assert {"time_ms", "speedup_vs_reference"} <= fe  # the frontend's fast order against the authors' order
    assert all(r["device"] and r["versions"] and r["commit"] and r["date"] for r in rows)
    mem = {r["provider"]: float(r["value"]) for r in rows if r["metric"] == "peak_mem_bytes"}
    assert mem["fused"] < mem["reference"]  # the chunked head holds less than the full logits
    assert "clips/s/core" in text


def test_gpu_suite_code_under_interpreter(tmp_path):
    """The whole GPU suite at tiny sizes, with soundfile and flash_attn unimportable as on the lent H200."""
    rows, _ = run_bench(["--suite", "gpu", "--smoke", "--device", "cpu"], tmp_path, without=GPU_MACHINE_LACKS)
    providers = {(r["op"], r["provider"]) for r in rows}
    assert ("rpq_codes", "fast") in providers and ("attention", "triton") in providers
    assert {(op, "fast") for op in ("layer_norm", "bias_gelu", "residual_drop_path")} <= providers  # the block ops
    assert {("logmel_power", "fast"), ("logmel_power", "reference")} <= providers
    assert {("pretrain_step", v) for v in ("a_eager_fp32", "b_bf16_sdpa", "c_fast", "c_fast_dispatcher",
                                           "e_pretrain_loop")} <= providers
    speed = [r for r in rows if r["metric"] == "speedup_vs_reference"]
    assert speed and all(float(r["value"]) > 0 for r in speed)
    # the report renders the GPU suite's rows, those without an MFU included (the dispatcher's (c), the loop (e))
    from bench.report import e2e_table, index

    table = e2e_table(index(rows))
    for variant in ("a_eager_fp32", "c_fast", "c_fast_dispatcher", "e_pretrain_loop"):
        assert sum(line.startswith(f"| {variant} |") for line in table) == 1


def test_plain_compile_variant_timed_beside_the_fast_path(monkeypatch):
    """e2e's b_plain_compile (torch.compile of plain PyTorch: reference ops, SDPA) is what the hand-fused (c) must
    beat: asked for, it is built with the reference ops under torch.compile, timed in the same rounds as c_fast,
    which gets its ratio to it (d_fast_compile too on a card: the interpreted Triton ops do not run compiled here);
    an unknown variant name fails before anything is built."""
    import torch

    from bench.common import Recorder
    from bench.e2e import VARIANTS, Variant, bench_e2e

    cpu = torch.device("cpu")
    # c_fast on the reference ops here: its interpreted Triton steps (3 s each) are the GPU smoke test's business
    monkeypatch.setitem(VARIANTS, "c_fast", VARIANTS["b_bf16_sdpa"])
    plain = Variant("b_plain_compile", cpu, "tiny", 2)
    assert plain.fwd is not plain.model and plain.cfg.kernels["rpq"] == "reference"  # compiled, plain ops
    assert VARIANTS["b_plain_compile"]["bf16"] and plain.cfg.kernels["attention"] == "sdpa"
    rec = Recorder("gpu", cpu)
    res = bench_e2e(rec, cpu, {"matmul_tflops": 1.0}, smoke=True,
                    variants=["b_plain_compile", "c_fast"], with_loop=False)
    assert set(res) == {"b_plain_compile", "c_fast"}
    ratios = {r["provider"]: float(r["value"]) for r in rec.rows if r["metric"] == "ratio_vs_plain_compile"}
    assert set(ratios) == {"c_fast"}
    for name, ratio in ratios.items():
        assert ratio == pytest.approx(res[name]["clips_per_s"] / res["b_plain_compile"]["clips_per_s"], rel=1e-5)
    with pytest.raises(ValueError, match="unknown e2e variants"):
        bench_e2e(Recorder("gpu", cpu), cpu, {"matmul_tflops": 1.0}, smoke=True, variants=["c_fast", "b_compiled"])


def test_gpu_session_names_only_known_pieces_and_variants():
    """Every --only piece and --variants name in bench/gpu_session.sh is one the suite knows (a misspelt one would
    measure nothing, silently, on a lent card), and the suite refuses unknown ones before measuring anything."""
    import re

    from bench.__main__ import ONLY_KEYS
    from bench.e2e import VARIANTS

    script = (ROOT / "bench" / "gpu_session.sh").read_text()
    only = {k for m in re.findall(r"--only ([\w,]+)", script) for k in m.split(",")}
    variants = {k for m in re.findall(r"--variants ([\w,]+)", script) for k in m.split(",")}
    assert {"e2e", "block", "inference"} <= only <= set(ONLY_KEYS)
    assert "b_plain_compile" in variants and variants <= {*VARIANTS, "e_pretrain_loop"}
    for bad in (["--only", "e2e,blocks"], ["--only", "e2e", "--variants", "c_fast,d_compile"]):
        res = subprocess.run([sys.executable, "-m", "bench", "--suite", "gpu", "--smoke", "--device", "cpu", *bad],
                             cwd=ROOT, capture_output=True, text=True)
        assert res.returncode == 2 and "unknown" in res.stderr and "bounds" not in res.stdout


def test_train_cpu_compare_runs():
    """bench.train_cpu (CPU training steps, float32 and bf16, now and as before the fused AdamW) at a toy size:
    every variant timed, a ratio per precision, the losses finite."""
    res = subprocess.run([sys.executable, "-m", "bench.train_cpu", "--preset", "tiny", "--batch", "2", "--rounds", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [ln for ln in res.stdout.splitlines() if "before / now" in ln]
    assert [ln.split(":")[0].strip() for ln in lines] == ["fp32", "bf16"], res.stdout
    assert all(float(ln.split("before / now")[1].split("x")[0]) > 0 and "nan" not in ln for ln in lines)


def test_bad_arguments_fail_fast():
    res = subprocess.run([sys.executable, "-m", "bench", "--suite", "gpu", "--device", "cpu"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "--smoke" in res.stderr
    res = subprocess.run([sys.executable, "-m", "bench", "--suite", "tpu"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_report_renders(tmp_path, monkeypatch, cpu_smoke):
    import bench.report as report

    rows, _, csv_path = cpu_smoke
    res_dir = tmp_path / "results"
    res_dir.mkdir()
    shutil.copy(csv_path, res_dir / "cpu.csv")
    monkeypatch.setattr(report, "RESULTS", res_dir)
    md = report.render()
    assert "| gather_tokens |" in md and "Encoder inference" in md and "Device: **" in md
    assert (res_dir / "plots" / "cpu_speedups.png").exists() or not any(
        r["metric"] == "speedup_vs_reference" for r in rows)


def test_profile_breakdown_groups_kernels_and_counts_idle():
    from bench.e2e_extra import breakdown, categorize

    assert categorize("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n") == "gemm"
    assert categorize("flash_fwd_kernel") == "attention"
    assert categorize("_rpq_codes_fwd_kernel") == "custom_ops"
    assert categorize("void at::native::vectorized_elementwise_kernel<4, ...>") == "norm_elementwise"
    assert categorize("multi_tensor_apply_kernel<FusedAdamMathFunctor>") == "optimizer"
    assert categorize("regular_fft_factor") == "frontend"
    # two overlapping gemms (0-4, 2-6), a gap, an elementwise kernel (8-9), over a wall time of 10
    shares = breakdown([("gemm_a", 0, 4), ("gemm_b", 2, 6), ("elementwise_x", 8, 9)], 10)
    assert abs(shares["idle"] - 0.3) < 1e-9  # busy 7 of 10
    assert abs(sum(shares.values()) - 1.0) < 1e-9
    assert abs(shares["gemm"] / shares["norm_elementwise"] - 8.0) < 1e-9  # 8 vs 1 units of kernel time


@pytest.mark.parametrize("how", ["raises", "sigterm"])
def test_rows_survive_a_failing_or_killed_piece(tmp_path, monkeypatch, how):
    """gpu_session.sh runs the suite in pieces under `timeout`: rows measured before an exception or the
    timeout's SIGTERM are still appended (they were all lost when the process died before its final write)."""
    import os
    import signal

    import bench.__main__ as bench_main
    from bench import ops

    def failing_step(rec, *args):
        rec.add("probe_op", "fast", "forward", "x", "time_ms", 1.0)
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        raise RuntimeError("boom")

    monkeypatch.setattr(ops, "bench_frontend", failing_step)
    old = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "rows.csv"
    try:
        with pytest.raises(SystemExit if how == "sigterm" else RuntimeError):
            bench_main.main(["--suite", "cpu", "--smoke", "--only", "frontend", "--out", str(out)])
    finally:
        signal.signal(signal.SIGTERM, old)
    rows = list(csv.DictReader(open(out)))
    assert {r["op"] for r in rows} == {"bound", "probe_op"}


@pytest.mark.parametrize("mode", [[], ["--in-process"]])
def test_ort_gemm_compare_runs(mode):
    """bench.ort_gemm (onnxruntime's GEMM against F.linear, the #19 batch-8 gap) at a toy size, each provider in a
    process of its own (the default) and all in one: a positive ratio per shape, every provider timed."""
    pytest.importorskip("onnxruntime")
    res = subprocess.run([sys.executable, "-m", "bench.ort_gemm", "--rows", "16", "--rounds", "1", "--reps", "1", *mode],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [ln for ln in res.stdout.splitlines() if "ratio" in ln]
    assert len(lines) == 4 and all(float(ln.split()[-1]) > 0 for ln in lines), res.stdout
    assert all("onnxruntime" in ln and "F.linear" in ln for ln in lines), res.stdout
