#!/usr/bin/env bash
# Create a TPU VM slice: on demand, spot, or through a queued resource.
usage() {
  cat <<'EOF'
usage: launch/create_tpu.sh [--name NAME] [--type TYPE] [--zone ZONE] [--project ID] [--version V]
                            [--spot] [--queued [--wait] [--valid-until DURATION] [--reserved]]

  --spot               spot capacity (cheaper, can be preempted at any time; jdelta saves on SIGTERM)
  --queued             ask through a queued resource (gcloud compute tpus queued-resources create
                       <name>-qr --node-id <name>); the slice is created when capacity is free
  --wait               with --queued: poll until the queued resource is ACTIVE (POLL_SECONDS, default 60)
  --valid-until D      with --queued: give up if not provisioned within D (e.g. 6h)
  --reserved           with --queued: use the project's reservation
Settings also come from TPU_NAME, ACCELERATOR_TYPE, ZONE, PROJECT, RUNTIME_VERSION (see launch/common.sh).

example: launch/create_tpu.sh --name jd-v5p --type v5p-64 --zone us-east5-a --spot --queued --wait
EOF
}
source "$(dirname "$0")/common.sh"

spot=0 queued_mode=0 wait_active=0 valid_until="" reserved=0
while [ $# -gt 0 ]; do
  if parse_common "$@"; then shift "$SHIFT"; continue; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --spot) spot=1; shift ;;
    --queued) queued_mode=1; shift ;;
    --wait) wait_active=1; shift ;;
    --valid-until) need_value "$1" "$#"; valid_until="$2"; shift 2 ;;
    --reserved) reserved=1; shift ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
[ "$queued_mode" = 1 ] || [ "$wait_active" = 0 ] || die "--wait needs --queued"
[ "$queued_mode" = 1 ] || [ -z "$valid_until" ] || die "--valid-until needs --queued"
[ "$queued_mode" = 1 ] || [ "$reserved" = 0 ] || die "--reserved needs --queued"
[ "$spot" = 0 ] || [ "$reserved" = 0 ] || die "--spot and --reserved exclude each other"
finish_settings

if [ "$queued_mode" = 0 ]; then
  extra=()
  [ "$spot" = 1 ] && extra+=(--spot)
  tpu create "$TPU_NAME" --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION" ${extra[@]+"${extra[@]}"}
  echo "created $TPU_NAME ($ACCELERATOR_TYPE) in $ZONE; next: launch/setup_tpu.sh --name $TPU_NAME"
  exit 0
fi

qr="$TPU_NAME-qr"
extra=()
[ "$spot" = 1 ] && extra+=(--spot)
[ "$reserved" = 1 ] && extra+=(--reserved)
[ -n "$valid_until" ] && extra+=(--valid-until-duration "$valid_until")
queued create "$qr" --node-id "$TPU_NAME" --accelerator-type "$ACCELERATOR_TYPE" \
  --runtime-version "$RUNTIME_VERSION" ${extra[@]+"${extra[@]}"}
echo "queued resource $qr asks for $TPU_NAME ($ACCELERATOR_TYPE) in $ZONE"
[ "$wait_active" = 1 ] || { echo "check with: gcloud compute tpus queued-resources describe $qr --zone $ZONE"; exit 0; }
while true; do
  state="$(queued describe "$qr" --format 'value(state.state)')"
  case "$state" in
    ACTIVE) echo "$qr is ACTIVE; next: launch/setup_tpu.sh --name $TPU_NAME"; exit 0 ;;
    FAILED|SUSPENDED) echo "$SCRIPT: error: queued resource $qr is $state" >&2; exit 1 ;;
    *) echo "$qr: ${state:-unknown}; waiting ${POLL_SECONDS:-60} s"; sleep "${POLL_SECONDS:-60}" ;;
  esac
done
