#!/usr/bin/env bash
# Stop the stage running on a TPU VM slice (SIGTERM: jdelta saves a checkpoint at the same step on
# every worker and exits), then optionally delete the slice.
usage() {
  cat <<'EOF2'
usage: launch/stop_tpu.sh [--name NAME] [--zone ZONE] [--project ID] [--repo-dir DIR]
                          [--timeout SECONDS] [--delete [--queued]]

Sends SIGTERM to the jdelta process that launch/run_tpu.sh started on every worker (its pid is in
REPO_DIR/jdelta.pid) and waits up to SECONDS (default 600) for it to exit; a worker whose process
is still running then is reported and the script exits 1 (nothing is deleted).
--delete deletes the TPU VM afterwards; with --queued, the queued resource <name>-qr that made it.

example: launch/stop_tpu.sh --name jd-v5p --delete --queued
EOF2
}
source "$(dirname "$0")/common.sh"

timeout_s=600 delete=0 queued_mode=0
while [ $# -gt 0 ]; do
  if parse_common "$@"; then shift "$SHIFT"; continue; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --timeout) need_value "$1" "$#"; timeout_s="$2"; shift 2 ;;
    --delete) delete=1; shift ;;
    --queued) queued_mode=1; shift ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
[[ "$timeout_s" =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds, got '$timeout_s'"
[ "$delete" = 1 ] || [ "$queued_mode" = 0 ] || die "--queued needs --delete"
finish_settings

on_all_workers "cd $REPO_DIR 2>/dev/null && [ -f jdelta.pid ] || { echo 'no jdelta.pid: nothing to stop'; exit 0; }; \
pid=\$(cat jdelta.pid); kill -TERM \$pid 2>/dev/null || { echo \"jdelta (pid \$pid) is not running\"; exit 0; }; \
for i in \$(seq $timeout_s); do kill -0 \$pid 2>/dev/null || { echo \"jdelta (pid \$pid) stopped\"; exit 0; }; sleep 1; done; \
echo \"jdelta (pid \$pid) still running after $timeout_s s\" >&2; exit 1" \
  || { echo "$SCRIPT: error: some worker's jdelta did not stop; not deleting" >&2; exit 1; }

if [ "$delete" = 1 ]; then
  if [ "$queued_mode" = 1 ]; then
    queued delete "$TPU_NAME-qr" --force --quiet
  else
    tpu delete "$TPU_NAME" --quiet
  fi
  echo "deleted $TPU_NAME"
fi
