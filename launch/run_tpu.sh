#!/usr/bin/env bash
# Run one jdelta stage on every worker of a TPU VM slice: one SPMD program over the whole slice.
usage() {
  cat <<'EOF2'
usage: launch/run_tpu.sh [--name NAME] [--zone ZONE] [--project ID] [--repo-dir DIR]
                         [--log FILE] [--foreground] [--] STAGE [jdelta args ...]

Starts `jdelta STAGE ...` on all workers at once with JDELTA_DISTRIBUTED=1: JAX finds the other
workers from the TPU VM metadata, and the stage's mesh spans every chip of the slice. In the
background by default (output to REPO_DIR/FILE on each worker, default run.log; pid in
REPO_DIR/jdelta.pid); --foreground keeps the SSH sessions attached and streams the output.
The run directory must be one path every worker sees (a gs:// bucket or a shared file system).

example: launch/run_tpu.sh --name jd-v5p distill --config configs/va_opd.yaml run_dir=gs://bucket/run1
EOF2
}
source "$(dirname "$0")/common.sh"

log=run.log foreground=0
while [ $# -gt 0 ]; do
  if parse_common "$@"; then shift "$SHIFT"; continue; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --log) need_value "$1" "$#"; log="$2"; shift 2 ;;
    --foreground) foreground=1; shift ;;
    --) shift; break ;;
    -*) usage >&2; die "unknown option '$1' (jdelta's own flags go after the stage name)" ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { usage >&2; die "no stage given (e.g. launch/run_tpu.sh distill --config FILE)"; }
[[ "$1" =~ ^[a-z][-a-z]*$ ]] || die "'$1' is not a jdelta stage name"
[[ "$log" =~ ^[A-Za-z0-9._/-]+$ ]] || die "--log '$log' must be a plain relative path"
finish_settings

args=$(printf '%q ' "$@")
env="JDELTA_DISTRIBUTED=1"
if [ "$foreground" = 1 ]; then
  on_all_workers "cd $REPO_DIR && . .venv/bin/activate && $env jdelta $args 2>&1 | tee $log"
else
  on_all_workers "cd $REPO_DIR && . .venv/bin/activate && ($env nohup jdelta $args > $log 2>&1 < /dev/null & echo \$! > jdelta.pid)"
  echo "started 'jdelta $1' on all workers of $TPU_NAME; logs: launch/logs_tpu.sh --name $TPU_NAME; stop: launch/stop_tpu.sh --name $TPU_NAME"
fi
