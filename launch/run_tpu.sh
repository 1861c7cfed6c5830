#!/usr/bin/env bash
# Run one jdelta stage on all workers of the slice (multi-host: every worker runs the same program;
# jax.distributed is initialised by jdelta from the TPU environment).
# Usage: launch/run_tpu.sh distill --config configs/qwen3-vl-8b-to-2b.yaml run_dir=gs://bucket/run1
source "$(dirname "$0")/common.sh"
args=$(printf '%q ' "$@")
on_all_workers "cd $REPO_DIR && . .venv/bin/activate && JDELTA_DISTRIBUTED=1 nohup jdelta $args > run.log 2>&1 &"
echo "started on all workers of $TPU_NAME; tail with: launch/logs_tpu.sh"
