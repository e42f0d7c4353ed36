#!/usr/bin/env bash
# The first duty of a session that has a GPU: one script, run through the device tool, e.g.
#   run(command="BESTRQ2_COMMIT=<git rev-parse --short HEAD here> bash bench/gpu_session.sh", timeout_s=570)
# (about 9 minutes; name the commit: the device's copy of .git lagged the tree it was sent once);
# `bash bench/gpu_session.sh sweep` afterwards runs the attention tuning sweep if time is left, and
# `bash bench/gpu_session.sh plain` (the next call, at once) (c) and (d) against torch.compile of plain PyTorch, and
# `bash bench/gpu_session.sh embed` batched file embedding against one file at a time (bench.embed_files)
# It installs the project over the machine's own torch/triton (no deps, so the pin pulls nothing),
# runs the GPU tests, then the GPU benchmark suite in pieces (each under its own timeout and each
# appending its rows to bench/results/gpu.csv, so a piece that overruns loses only itself), and
# leaves logs and the CSV under $OUT. Commit bench/results/gpu.csv and bestrq2/attention_wins.json (the
# attention wins that auto reads), then `python -m bench.report`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bestrq2-gpu}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -1  # no isolation: the machine has no index to fetch setuptools from
python - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(0))
for m in ("safetensors", "soundfile", "scipy", "tqdm", "numpy", "matplotlib", "flash_attn"):
    try:
        __import__(m); print(m, "ok")
    except ImportError as e:
        print(m, "MISSING", e)
PY
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >>"$OUT/env.txt" 2>&1
# the training loader's workers (variant (e)) pass batches through /dev/shm: its size and the cores they get
{ echo "cores $(nproc)"; df -h /dev/shm | tail -1; } >>"$OUT/env.txt" 2>&1
if [ "${1:-}" = "plain" ]; then  # a second call, at once (the machine is handed back after 30 s idle): the claim
  # itself, the hand-fused (c) and (d) against torch.compile of plain PyTorch (b_plain_compile), timed in the same
  # rounds; its compile takes about as long as (d)'s did (2026-11-26: (d)'s piece 112 s), (d) recompiles from the
  # cache the main call left
  echo "== e2e against torch.compile of plain PyTorch (limit 300s)" | tee -a "$OUT/bench_gpu.txt"
  timeout 300 python -m bench --suite gpu --only e2e --variants b_plain_compile,c_fast,d_fast_compile 2>&1 \
    | tee -a "$OUT/bench_gpu.txt" | tail -20
  cp bench/results/gpu.csv "$OUT/" 2>/dev/null || true
  exit 0
fi
if [ "${1:-}" = "embed" ]; then  # a second call, if device time is left: embed_files' batches on the card
  echo "== embed_files (limit 150s)" | tee -a "$OUT/embed_files.txt"
  timeout 150 python -m bench.embed_files --device cuda --files 48 --batch 1 8 32 --rounds 3 2>&1 | tee -a "$OUT/embed_files.txt"
  timeout 60 python -m bench.embed_files --device cuda --files 32 --fixed 10 --batch 1 8 32 --rounds 3 2>&1 | tee -a "$OUT/embed_files.txt"
  exit 0
fi
if [ "${1:-}" = "sweep" ]; then  # a second call, if device time is left: the attention tuning sweep
  echo "== attention tuning sweep (limit 50s)" | tee -a "$OUT/bench_gpu.txt"
  timeout 50 python -m bench.gpu_probe --wins 2>&1 | tee -a "$OUT/bench_gpu.txt" | tail -14
  cp bench/results/sweeps/gpu-attention.csv bestrq2/attention_wins.json "$OUT/" 2>/dev/null || true
  exit 0
fi
# the step's own cuda tests first (no host sync, side-stream copies, one compile for all mask sizes, the Triton
# ops' short eager path: quick), then the kernel tests, which compile for minutes on a fresh machine (2026-11-26:
# 119 s of the 120)
timeout ${T_TESTS:-120} bash -c 'python -m pytest -v -m cuda tests/test_step.py;
  python -m pytest -v -m cuda tests/ --ignore=tests/test_step.py' 2>&1 | tee "$OUT/gpu_tests.txt" | grep -E "passed|failed|error" | tail -4
# never yet run on a card: if the ops' short eager path (kernels/_op.py) fails there, measure through the
# torch.library dispatcher instead of losing the pieces that run the Triton ops eagerly
if grep -qE "test_triton_ops_short_eager_path_on_cuda (FAILED|ERROR)" "$OUT/gpu_tests.txt"; then
  export BESTRQ2_EAGER_OPS=0
  echo "BESTRQ2_EAGER_OPS=0: the short eager path failed its cuda test" | tee -a "$OUT/env.txt"
fi
piece() {  # piece SECONDS ARGS...: one slice of the suite, appended to the log and the CSV
  local t=$1; shift
  echo "== bench $* (limit ${t}s)" | tee -a "$OUT/bench_gpu.txt"
  timeout "$t" python -m bench --suite gpu "$@" 2>&1 | tee -a "$OUT/bench_gpu.txt" | tail -30
  cp bench/results/gpu.csv "$OUT/" 2>/dev/null || true
}
# limits from the 2026-11-26 H200 session (each piece took about half of its limit there)
piece 70 --only rpq,gather,head,frontend
piece 30 --only attention
piece 40 --only inference  # + CUDA-graph captures at B 1, 8, 64
# the Triton attention's default config vs SDPA at N 64/77/128/256 (77: the encoder's longest visible run),
# the model's packed-qkv form against SDPA's: the table auto attention reads
echo "== attention wins (limit 40s)" | tee -a "$OUT/bench_gpu.txt"
timeout 40 python -m bench.gpu_probe --configs default --wins 2>&1 | tee -a "$OUT/bench_gpu.txt" | tail -10
cp bench/results/sweeps/gpu-attention.csv bestrq2/attention_wins.json "$OUT/" 2>/dev/null || true
# (a)-(d) built in one process and timed interleaved (compile in the warm-up), a profile of each,
# then (e) the real pretrain loop on prepared shards (compiles again if (d) won): estimated ~200 s
piece 250 --only e2e
# the block ops (layer norm, bias + GELU, drop-path + residual, add + layer norm) against their references and
# torch.compile:
# last, so that if the lease's time runs out only this piece is lost (its limit is a guess: never run on a GPU)
piece 60 --only block
