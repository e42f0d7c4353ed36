"""Every Triton launch of the GPU paths compiles for an H100/H200 (sm_90) on this CPU-only machine, within the
card's shared memory: ``python -m bench.gpu_compile`` in a process without ``TRITON_INTERPRET`` (the
interpreter accepts kernels the compiler rejects: a loop-carried value that changes type, tiles that do
not fit shared memory). Runtime faults, numerics and speed still need the card (``pytest -m cuda``)."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_launch_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_compile", "--arch", "90"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "all compile within shared memory" in out, out[-4000:]
    summary = next(line for line in out.splitlines() if " launches, " in line and " distinct" in line)
    distinct = int(summary.split(" launches, ")[1].split()[0])
    # every scenario launched (model step bf16 / fp32, tokens with position tables, attention at 64 / 128 / 256
    # tokens, packed qkv attention with its bias, RPQ from the log-mel and from rows, head, drop-path): 47
    # distinct launches on 2026-12-02 before the packed form
    assert distinct >= 40, summary
    for kernel in ("_attn_bwd_dkdv_kernel", "_attn_bwd_one_tile_kernel", "_rpq_codes_fwd_kernel", "_ce_rows_kernel",
                   "_layer_norm_bwd_kernel", "_bias_gelu_bwd_kernel", "_scatter_tokens_bwd_pos_kernel",
                   "_gather_tokens_bwd_kernel", "_scale_add_kernel", "_gather_tokens_fwd_kernel(HAS_POS=True",
                   "_rpq_codes_fwd_kernel(FROM_SPEC=False", "_add_layer_norm_fwd_kernel(HAS_BB=False, HAS_SCALE=True",
                   "_add_layer_norm_fwd_kernel(HAS_BB=True", "_add_layer_norm_bwd_kernel(HAS_DS=True, HAS_SCALE=True",
                   "_add_layer_norm_bwd_kernel(HAS_DS=True, HAS_SCALE=False, HAS_BB=True"):
        assert f"ok   {kernel}" in out, kernel
    # registers that spill to the stack cost local-memory traffic: none in the RPQ (it spilled 1.8-5.4 KB a
    # thread at 64-row tiles), the token gather/scatter, the block ops or the head's row kernel
    spilling = [line for line in out.splitlines() if "SPILLS" in line and "_attn_" not in line]
    assert not spilling, "\n".join(spilling)
    # the instruction mix from the SASS: the training path's products run on the tensor cores (Hopper's
    # wgmma for the bf16 attention, mma.sync tf32 for the RPQ's 3xTF32 scores), and the RPQ's scoring loop
    # stays lean: 374 instructions per 128-code tile on 2026-12-02 (triton 3.9), against 702 when each
    # tile was reduced across warps (shuffles and barriers every tile)
    lines = out.splitlines()
    attn = [(f"{k}, HAS_BIAS={b}, DOT_FP32=False", "HGMMA") for b in (True, False)  # (True: the model's qkv form)
            for k in ("_attn_fwd_kernel(BLOCK_M=128, BLOCK_N=128, D_PAD=64", "_attn_bwd_one_tile_kernel(BLOCK=128, D_PAD=64",
                      "_attn_bwd_dkdv_kernel(BLOCK_M=64, BLOCK_N=64, D_PAD=64")]
    for kernel, mma in attn + [("PRECISION=tf32x3", "HMMA.1688.F32.TF32")]:
        found = [line for line in lines if kernel in line]
        assert found and all(mma in line for line in found), (kernel, found)
    # what each kernel writes, as torch.compile's mutation analysis reads its TTIR: its outputs and nothing else.
    # An input it takes for written (a pointer handed to a helper whose results address a store: the tile
    # helpers did this to x, s, the bias and cu_seqlens until 2026-12-02) is copied before every launch under
    # torch.compile, and a written pointer that shares memory with another argument loses writes there
    # (gpu_compile fails on that: the return code above)
    written: dict[str, set] = {}
    for line in lines:
        m = re.match(r"\s+sm_\d+ \S+\s+(_\w+_kernel)\(.*, writes \[([^\]]*)\]", line)
        if m:
            written.setdefault(m.group(1), set()).update(m.group(2).split())
    expected = {
        "_add_layer_norm_fwd_kernel": "s y mean rstd", "_add_layer_norm_bwd_kernel": "dx dbr part",
        "_layer_norm_fwd_kernel": "y mean rstd", "_layer_norm_bwd_kernel": "dx part",
        "_bias_gelu_fwd_kernel": "y", "_bias_gelu_bwd_kernel": "dx db", "_scale_add_kernel": "out",
        "_attn_fwd_kernel": "o lse", "_attn_bwd_one_tile_kernel": "g db", "_attn_bwd_dkdv_kernel": "g db",
        "_attn_bwd_dq_kernel": "g db", "_gather_tokens_fwd_kernel": "out", "_gather_tokens_bwd_kernel": "gx gpos",
        "_scatter_tokens_fwd_kernel": "out", "_scatter_tokens_bwd_pos_kernel": "gpos",
        "_rpq_codes_fwd_kernel": "best second arg",  # arg: the rescoring launch updates the codes in place
        "_ce_rows_kernel": "logits loss hit",  # logits: overwritten by their gradient, by design
    }
    compiled = {m.group(1) for m in re.finditer(r"sm_\d+ \S+\s+(_\w+_kernel)\(", out)}
    assert compiled == set(written), ("launches without the mutation analysis", compiled - set(written))
    assert {k: {f"{a}_ptr" for a in v.split()} for k, v in expected.items()} == written, written

    rpq = [line for line in lines if "PRECISION=tf32x3" in line and "BLOCK_K=128" in line]
    loops = [int(re.search(r"loop bodies (\d+) \((\d+) mma", line).group(1)) for line in rpq]
    assert loops and max(loops) <= 450, rpq


def test_instruction_mix_reads_loops_and_tensor_core_ops():
    """instruction_mix on a hand-written SASS fragment: one loop (a backward branch), its body length,
    tensor-core instructions and barriers; predicated instructions count by their opcode."""
    from bench.gpu_compile import instruction_mix

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.1688.F32.TF32 R4, R8, R12, R4 ;
        /*0020*/               @P0 HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0030*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0040*/              @!P1 BRA 0x10 ;
        /*0050*/                   EXIT ;
        /*0060*/                   BRA 0x60;
    """
    mix = instruction_mix(sass)
    assert mix["total"] == 7
    assert mix["mma"] == {"HGMMA.64x64x16.F32.BF16": 1, "HMMA.1688.F32.TF32": 1}
    assert mix["loops"] == [{"instructions": 4, "mma": 2, "barriers": 1}]


def test_step_inventory_counts_a_step_without_running_its_kernels():
    """``python -m bench.step_inventory`` (interpreter off, launches recorded): one tiny step's ops grouped as
    GEMM / custom (Triton) / eager with bytes fitted over two batch sizes; the residual stream's float32
    gradient adds and the Triton ops show up by name."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.step_inventory", "--preset", "tiny", "--batch", "1", "2",
                           "--at", "8", "--top", "40"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    table = {tuple(line.split()[:2]): line.split() for line in out.splitlines()
             if line.split()[:1] in (["GEMM"], ["custom"], ["eager"])}
    for kind in ("GEMM", "custom", "eager"):
        for phase in ("fwd", "bwd"):
            assert float(table[(kind, phase)][3]) > 0, out  # GB at batch 8
    assert float(table[("GEMM", "fwd")][4]) > 0, out  # TFLOP
    for op in ("bestrq2::layer_norm_bwd", "bestrq2::rpq_codes", "bestrq2::qkv_attention_fwd", "aten::add"):
        assert op in out, op


def test_compiled_triton_step_copies_no_input_before_a_kernel():
    """``python -m bench.gpu_compile --trace-step``: the GPU path's training step (every op on Triton, the packed
    attention, bf16 autocast) compiles with ``fullgraph=True`` through AOTAutograd on this machine (kernels recorded,
    not run), and its functional graphs copy nothing but fresh outputs before a kernel writes them. With the tile
    helpers of 2026-12-01 (a pointer handed to a helper whose results address a store) torch.compile took LayerNorm's
    x and the add + LayerNorm's x and s for written: 17 input copies in this tiny step, a copy of the residual stream
    before each launch at ViT-B."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_compile", "--trace-step"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "2 graphs (forward, backward)" in out and "attention triton" in out, out[-4000:]
    assert "no input is copied before a kernel" in out, out[-4000:]
    launches = int(re.search(r"(\d+) kernel launches recorded", out).group(1))
    assert launches > 40, out[-2000:]


def test_host_overhead_probe_counts_the_dispatcher_calls():
    """``python -m bench.host_overhead`` (interpreter off, launches recorded): a step's wall time by phase, its ATen
    ops and Triton launches, and how many Triton op calls went through the torch.library dispatcher: none with the
    short eager path, every one with BESTRQ2_EAGER_OPS=0."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BESTRQ2_EAGER_OPS")}
    proc = subprocess.run([sys.executable, "-m", "bench.host_overhead", "--depth", "2", "--predictor-depth", "1",
                           "--steps", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    m = re.search(r"Triton op calls: (\d+), of which through the torch.library dispatcher: (\d+) "
                  r"\(BESTRQ2_EAGER_OPS=1\); (\d+) with BESTRQ2_EAGER_OPS=0", out)
    assert m, out
    calls, dispatched, dispatched_off = map(int, m.groups())
    assert calls >= 20 and dispatched == 0 and dispatched_off == calls, out
    m = re.search(r"host work: ([\d.]+) ms for \d+ ATen ops and \d+ Triton launches", out)
    assert m, out
    # taken out of the same profiled steps' own walls: not negative, not above those walls (+ 10 us an op put back)
    prof = re.search(r"profiled: \d+ more steps, wall median ([\d.]+) ms.*\((\d+) GEMM", out)
    assert prof and float(m.group(1)) <= float(prof.group(1)) + 0.01 * int(prof.group(2)) + 0.05, out
    assert re.search(r"prepare [\d.]+ ms, forward [\d.]+ ms, backward [\d.]+ ms, optimizer [\d.]+ ms", out), out
    m = re.search(r"ATen ops that compute \(top level, a kernel each on a GPU\): (\d+): (.*)", out)
    assert m and int(m.group(1)) > 50 and "mm " in m.group(2) and "reshape" not in m.group(2), out
