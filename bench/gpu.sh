#!/usr/bin/env bash
# The one GPU command (bench/gpu.py): every GPU-marked test and benchmark, about 8 minutes on a lent GPU,
# one results file under bench/results/. `bench/gpu.sh --smoke --out DIR` runs the same at tiny sizes on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=disabled RAY_USAGE_STATS_ENABLED=0
exec "$PYTHON" bench/gpu.py "$@"
