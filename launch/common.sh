#!/usr/bin/env bash
# Shared settings and helpers for the TPU VM scripts (sourced, not run).
#
# Every setting comes from the environment or from a flag (flags win):
#   --name NAME       TPU_NAME          the TPU VM (node) name                     [jdelta]
#   --zone ZONE       ZONE              GCE zone                                   [us-central2-b]
#   --project ID      PROJECT           GCP project            [gcloud config get-value project]
#   --type TYPE       ACCELERATOR_TYPE  slice type, e.g. v4-32, v5p-64, v5litepod-16, v6e-16  [v4-32]
#   --version V       RUNTIME_VERSION   TPU VM image            [chosen from the accelerator type]
#   --repo-dir DIR    REPO_DIR          where the code lives on every worker       [~/jdelta]
# Scripts that take a command (run_tpu.sh) stop reading flags at the first non-flag word or at "--".
set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$LAUNCH_DIR/.." && pwd)"
SCRIPT="launch/$(basename "$0")"

: "${TPU_NAME:=jdelta}"
: "${ZONE:=us-central2-b}"
: "${ACCELERATOR_TYPE:=v4-32}"
: "${RUNTIME_VERSION:=}"
: "${PROJECT:=}"
: "${REPO_DIR:=~/jdelta}"

die() { echo "$SCRIPT: error: $*" >&2; exit 2; }

# need_value FLAG NEXT_ARG_COUNT: a flag that takes a value must have one.
need_value() { [ "$2" -ge 2 ] || die "$1 needs a value"; }

# parse_common FLAG VALUE: handle one shared flag; returns 1 if FLAG is not a shared flag.
# Sets SHIFT to the number of words consumed.
parse_common() {
  case "$1" in
    --name) need_value "$1" "$#"; TPU_NAME="$2"; SHIFT=2 ;;
    --zone) need_value "$1" "$#"; ZONE="$2"; SHIFT=2 ;;
    --project) need_value "$1" "$#"; PROJECT="$2"; SHIFT=2 ;;
    --type) need_value "$1" "$#"; ACCELERATOR_TYPE="$2"; SHIFT=2 ;;
    --version) need_value "$1" "$#"; RUNTIME_VERSION="$2"; SHIFT=2 ;;
    --repo-dir) need_value "$1" "$#"; REPO_DIR="$2"; SHIFT=2 ;;
    *) return 1 ;;
  esac
}

# default_runtime TYPE: the TPU VM image for an accelerator type (Cloud TPU docs, "TPU VM images").
default_runtime() {
  case "$1" in
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "unknown accelerator type '$1' (expected v4-N, v5litepod-N, v5p-N or v6e-N; or pass --version)" ;;
  esac
}

# finish_settings: resolve defaults that need other settings; check the name.
finish_settings() {
  [[ "$TPU_NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
    || die "TPU name '$TPU_NAME' is not valid (lowercase letters, digits and '-', starting with a letter)"
  if [ -z "$PROJECT" ]; then
    PROJECT="$(gcloud config get-value project 2>/dev/null || true)"
    [ -n "$PROJECT" ] || die "no GCP project: pass --project ID or set PROJECT (or run 'gcloud config set project ID')"
  fi
  if [ -z "$RUNTIME_VERSION" ]; then RUNTIME_VERSION="$(default_runtime "$ACCELERATOR_TYPE")"; fi
}

tpu() { gcloud compute tpus tpu-vm "$@" --zone "$ZONE" --project "$PROJECT"; }
queued() { gcloud compute tpus queued-resources "$@" --zone "$ZONE" --project "$PROJECT"; }
# on_workers WORKERS COMMAND: run COMMAND on the given workers ("all" or a number) over SSH.
on_workers() { tpu ssh "$TPU_NAME" --worker="$1" --command "$2"; }
on_all_workers() { on_workers all "$1"; }
