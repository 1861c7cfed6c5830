#!/usr/bin/env bash
# Copy this checkout to every worker and install it with JAX's TPU wheels.
# Usage: launch/setup_tpu.sh   (run from the repository root)
source "$(dirname "$0")/common.sh"
tar czf /tmp/jdelta_src.tgz --exclude .venv --exclude runs --exclude .git .
tpu scp /tmp/jdelta_src.tgz "$TPU_NAME":/tmp/jdelta_src.tgz --worker=all
on_all_workers "mkdir -p $REPO_DIR && tar xzf /tmp/jdelta_src.tgz -C $REPO_DIR && cd $REPO_DIR && \
  python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip && \
  pip install -q -e . 'jax[tpu]' && python -c 'import jax; print(jax.process_index(), jax.device_count())'"
