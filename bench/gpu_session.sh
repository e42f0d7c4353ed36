#!/usr/bin/env bash
# The first duty of a session that has a GPU: one script, run through the device tool, e.g.
#   run(command="bash bench/gpu_session.sh", timeout_s=600)
# It installs the project over the machine's own torch/triton (no deps, so the pin pulls nothing),
# runs the GPU tests, then the GPU benchmark suite, and leaves the results under $OUT (and
# bench/results/gpu.csv). Commit bench/results/gpu.csv, then run `python -m bench.report` locally.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bestrq2-gpu}
mkdir -p "$OUT"
pip install -q -e . --no-deps 2>&1 | tail -1
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
timeout 240 python -m pytest -q -m cuda tests/test_gpu.py 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
timeout 480 python -m bench --suite gpu 2>&1 | tail -40 | tee "$OUT/bench_gpu.txt"
cp bench/results/gpu.csv "$OUT/" 2>/dev/null || true
