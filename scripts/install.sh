#!/usr/bin/env bash
# Installs bestrq2 and its test tools. Keeps an existing torch (a GPU machine's CUDA build);
# otherwise installs the pinned CPU release first, so pip never pulls a multi-GB CUDA build here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q -r requirements/torch-cpu.txt
fi
"$PY" -m pip install -q -e '.[dev]'
