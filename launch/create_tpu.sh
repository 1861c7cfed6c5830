#!/usr/bin/env bash
# Create a TPU VM slice. Usage: TPU_NAME=x ACCELERATOR_TYPE=v5p-64 launch/create_tpu.sh
source "$(dirname "$0")/common.sh"
extra=()
[ "$SPOT" = 1 ] && extra+=(--spot)
tpu create "$TPU_NAME" --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION" "${extra[@]}"
