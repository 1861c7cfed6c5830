#!/usr/bin/env bash
# Show the last lines of worker 0's log (WORKER=n for another).
source "$(dirname "$0")/common.sh"
tpu ssh "$TPU_NAME" --worker="${WORKER:-0}" --command "tail -n ${LINES:-50} $REPO_DIR/run.log"
