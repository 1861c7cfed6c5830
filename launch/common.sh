#!/usr/bin/env bash
# Shared settings for the TPU VM scripts. Override any of these in the environment.
set -euo pipefail
: "${TPU_NAME:=jdelta}"
: "${ZONE:=us-central2-b}"
: "${ACCELERATOR_TYPE:=v4-32}"
: "${RUNTIME_VERSION:=tpu-ubuntu2204-base}"
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${REPO_DIR:=\$HOME/jdelta}"          # where the code lives on every worker
: "${SPOT:=0}"                          # 1 = spot/preemptible capacity

tpu() { gcloud compute tpus tpu-vm "$@" --zone "$ZONE" --project "$PROJECT"; }
on_all_workers() { tpu ssh "$TPU_NAME" --worker=all --command "$1"; }
