#!/usr/bin/env bash
# Run a stage on a single GPU host (all local GPUs form the mesh). Installs JAX's CUDA wheels on first use.
# Usage: launch/run_gpu.sh sample --model /models/Qwen3-VL-2B-Instruct --prompts seeds/records.jsonl --n 8
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d .venv ]; then
  python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip && pip install -q -e . 'jax[cuda12]'
fi
. .venv/bin/activate
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec jdelta "$@"
