#!/usr/bin/env bash
# Copy this checkout to every worker of a TPU VM slice and install it with JAX's TPU wheels.
usage() {
  cat <<'EOF2'
usage: launch/setup_tpu.sh [--name NAME] [--zone ZONE] [--project ID] [--repo-dir DIR] [--jax SPEC]

Packs this checkout (without .git, .venv, runs/, caches), copies it to every worker, unpacks it
into REPO_DIR (default ~/jdelta), makes REPO_DIR/.venv and installs jdelta with SPEC (default
'jax[tpu]'), then prints each worker's process index and device count as a check.

example: launch/setup_tpu.sh --name jd-v5p --zone us-east5-a
EOF2
}
source "$(dirname "$0")/common.sh"

jax_spec="${JAX_SPEC:-jax[tpu]}"
while [ $# -gt 0 ]; do
  if parse_common "$@"; then shift "$SHIFT"; continue; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --jax) need_value "$1" "$#"; jax_spec="$2"; shift 2 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
finish_settings

tarball="${TMPDIR:-/tmp}/jdelta_src_$TPU_NAME.tgz"
tar czf "$tarball" -C "$REPO_ROOT" --exclude ./.git --exclude ./.venv --exclude ./runs \
  --exclude __pycache__ --exclude '*.egg-info' --exclude .pytest_cache --exclude .ruff_cache .
tpu scp "$tarball" "$TPU_NAME:/tmp/jdelta_src.tgz" --worker=all
on_all_workers "set -e; mkdir -p $REPO_DIR && tar xzf /tmp/jdelta_src.tgz -C $REPO_DIR && cd $REPO_DIR && \
python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip && \
pip install -q -e . $(printf '%q' "$jax_spec") && \
python -c 'import jax; print(\"worker\", jax.process_index(), \"devices\", jax.device_count())'"
echo "installed on every worker of $TPU_NAME; next: launch/run_tpu.sh --name $TPU_NAME <stage> [args]"
