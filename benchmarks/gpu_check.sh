#!/usr/bin/env bash
# One prepared GPU check (issue 21): GPU-marked tests, ViT-L-14-336 / 518 px inference in the layout of the paper's
# Table 3 (fp32 and bf16, batch 1 and 8, R = 1 and 10), one training epoch of the teaching preset, and the inference
# benchmark with the time left; one markdown table in benchmarks/results/gpu_check_<gpu>.md. Under 5 minutes, no
# internet needed (random weights). Details: benchmarks/gpu_check.py. Without a CUDA device it says so and exits 0.
#
#   bash benchmarks/gpu_check.sh            # from a checkout, after the README's install (python3 dev.py test)
#
# BPFL_PYTHON=/path/to/python picks another interpreter than the checkout's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${BPFL_PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
  echo "gpu_check: $PY not found; creating .venv as the README's install does (python3 dev.py)" >&2
  python3 -c 'import dev; dev.ensure_env()'
  PY=.venv/bin/python
fi
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1
# the script keeps to a 285 s budget itself; this is the hard stop
exec timeout --signal=INT --kill-after=15 330 "$PY" benchmarks/gpu_check.py "$@"
