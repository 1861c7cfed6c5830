#!/usr/bin/env bash
# Stop the running stage on every worker (SIGTERM: jdelta saves a checkpoint and exits), then
# optionally delete the slice (DELETE=1).
source "$(dirname "$0")/common.sh"
on_all_workers "pkill -TERM -f 'jdelta ' || true"
if [ "${DELETE:-0}" = 1 ]; then tpu delete "$TPU_NAME" --quiet; fi
