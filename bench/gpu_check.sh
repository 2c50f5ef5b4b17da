#!/usr/bin/env bash
# One prepared GPU check: finetune + evaluate + serve on the default base and on a synthetic ~1.5B
# model; prints training and generation tokens/s, peak GPU memory and training MFU (against the GPU's
# dense bf16 peak, e.g. H200 989 TFLOP/s). What it measures and how: bench/gpu_check.py.
#
#   bench/gpu_check.sh                                  # both models, the defaults (~10 min on an H200)
#   bench/gpu_check.sh --models default --max_steps 40  # options: bench/gpu_check.sh --help
#   PYTHON=/path/to/python bench/gpu_check.sh           # an interpreter with a CUDA build of torch
#
# Without a CUDA GPU it stops at once with one line and exit code 2.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "gpu_check: no Python at $PYTHON; run make setup, or set PYTHON to an interpreter with the project's requirements" >&2
    exit 2
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
# The steps' own logs go to per-step files under the work directory; these keep the console short.
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$PYTHON" bench/gpu_check.py "$@"
