#!/usr/bin/env bash
# Show the log of a stage started with launch/run_tpu.sh.
usage() {
  cat <<'EOF2'
usage: launch/logs_tpu.sh [--name NAME] [--zone ZONE] [--project ID] [--repo-dir DIR]
                          [--worker N | --all] [--lines N] [--follow] [--log FILE]

Prints the last N lines (default 50) of REPO_DIR/FILE (default run.log) on worker N (default 0,
the process that writes the run directory's manifest), or on every worker with --all.
--follow keeps printing as the log grows (Ctrl-C to stop; the run goes on).

example: launch/logs_tpu.sh --name jd-v5p --follow
EOF2
}
source "$(dirname "$0")/common.sh"

worker=0 lines=50 follow=0 log=run.log
while [ $# -gt 0 ]; do
  if parse_common "$@"; then shift "$SHIFT"; continue; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --worker) need_value "$1" "$#"; worker="$2"; shift 2 ;;
    --all) worker=all; shift ;;
    --lines) need_value "$1" "$#"; lines="$2"; shift 2 ;;
    --follow) follow=1; shift ;;
    --log) need_value "$1" "$#"; log="$2"; shift 2 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
[[ "$worker" =~ ^([0-9]+|all)$ ]] || die "--worker must be a worker number or 'all', got '$worker'"
[[ "$lines" =~ ^[0-9]+$ ]] || die "--lines must be a number, got '$lines'"
[[ "$log" =~ ^[A-Za-z0-9._/-]+$ ]] || die "--log '$log' must be a plain relative path"
finish_settings

flag=""
[ "$follow" = 1 ] && flag="-F "
on_workers "$worker" "tail ${flag}-n $lines $REPO_DIR/$log"
