#!/usr/bin/env bash
# Run one jdelta stage on GPUs: one host, a SLURM job over several nodes, or hosts started by hand
# with an explicit coordinator. Every process runs the same program; the mesh spans all GPUs.
usage() {
  cat <<'EOF2'
usage: launch/run_gpu.sh [--install] [MODE] [--] STAGE [jdelta args ...]

modes:
  (none)                      this host only; all its GPUs form the mesh
  --sbatch --nodes N [--gpus-per-node G] [--partition P] [--time T] [--account A] [--job-name J]
                              submit a SLURM job: N nodes, one jdelta process per node (G GPUs each,
                              default 8); the job runs this script with --srun (log: slurm-<job id>.out)
  --srun                      inside a SLURM allocation: srun one process per node; JAX reads the
                              coordinator, process count and index from SLURM's environment
  --coordinator HOST:PORT --num-processes N --process-id I
                              explicit: run this on every host, I = 0 .. N-1, HOST:PORT = process 0's
                              host and a free port (exports JDELTA_COORDINATOR, JDELTA_NUM_PROCESSES,
                              JDELTA_PROCESS_ID; JDELTA_INIT_TIMEOUT seconds to wait, default 300)
  --install                   first make .venv and install jdelta with 'jax[cuda12]' (JAX_SPEC to change)

The run directory must be one path every process sees (a shared file system or a bucket).
VENV (default: the checkout's .venv) is activated when present.

examples:
  launch/run_gpu.sh sample --model /models/Qwen3-VL-2B-Instruct --prompts seeds/records.jsonl --n 8
  launch/run_gpu.sh --sbatch --nodes 4 --partition h100 --time 12:00:00 -- distill --config cfg.yaml
  launch/run_gpu.sh --coordinator 10.0.0.1:8476 --num-processes 2 --process-id 1 -- score --config cfg.yaml
EOF2
}
set -euo pipefail
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$LAUNCH_DIR/.." && pwd)"
SCRIPT="launch/run_gpu.sh"
die() { echo "$SCRIPT: error: $*" >&2; exit 2; }
need_value() { [ "$2" -ge 2 ] || die "$1 needs a value"; }
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

mode=local install=0 nodes="" gpus=8 partition="" time_limit="" account="" job_name=jdelta
coordinator="" nproc="" pid=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --install) install=1; shift ;;
    --sbatch) mode=sbatch; shift ;;
    --srun) mode=srun; shift ;;
    --nodes) need_value "$1" "$#"; nodes="$2"; shift 2 ;;
    --gpus-per-node) need_value "$1" "$#"; gpus="$2"; shift 2 ;;
    --partition) need_value "$1" "$#"; partition="$2"; shift 2 ;;
    --time) need_value "$1" "$#"; time_limit="$2"; shift 2 ;;
    --account) need_value "$1" "$#"; account="$2"; shift 2 ;;
    --job-name) need_value "$1" "$#"; job_name="$2"; shift 2 ;;
    --coordinator) need_value "$1" "$#"; coordinator="$2"; shift 2 ;;
    --num-processes) need_value "$1" "$#"; nproc="$2"; shift 2 ;;
    --process-id) need_value "$1" "$#"; pid="$2"; shift 2 ;;
    --) shift; break ;;
    -*) usage >&2; die "unknown option '$1' (jdelta's own flags go after the stage name)" ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { usage >&2; die "no stage given (e.g. launch/run_gpu.sh sample --model DIR ...)"; }
[[ "$1" =~ ^[a-z][-a-z]*$ ]] || die "'$1' is not a jdelta stage name"

if [ -n "$coordinator$nproc$pid" ]; then
  [ "$mode" = local ] || die "--coordinator/--num-processes/--process-id cannot be combined with --$mode"
  mode=explicit
  [ -n "$coordinator" ] && [ -n "$nproc" ] && [ -n "$pid" ] \
    || die "explicit mode needs all of --coordinator HOST:PORT, --num-processes N and --process-id I"
  [[ "$coordinator" =~ ^[^:[:space:]]+:[0-9]+$ ]] || die "--coordinator must be HOST:PORT, got '$coordinator'"
  is_int "$nproc" && [ "$nproc" -ge 1 ] || die "--num-processes must be a positive integer, got '$nproc'"
  is_int "$pid" || die "--process-id must be an integer, got '$pid'"
  [ "$pid" -lt "$nproc" ] || die "--process-id $pid is not below --num-processes $nproc"
fi
if [ "$mode" = sbatch ]; then
  [ -n "$nodes" ] || die "--sbatch needs --nodes N"
  is_int "$nodes" && [ "$nodes" -ge 1 ] || die "--nodes must be a positive integer, got '$nodes'"
  is_int "$gpus" && [ "$gpus" -ge 1 ] || die "--gpus-per-node must be a positive integer, got '$gpus'"
elif [ -n "$nodes$partition$time_limit$account" ] || [ "$job_name" != jdelta ]; then
  die "--nodes/--gpus-per-node/--partition/--time/--account/--job-name need --sbatch"
fi
if [ "$mode" = srun ] && [ -z "${SLURM_JOB_ID:-}" ]; then
  die "--srun runs inside a SLURM allocation (no SLURM_JOB_ID); use --sbatch to submit a job"
fi

venv="${VENV:-$REPO_ROOT/.venv}"
if [ "$install" = 1 ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -U pip
  "$venv/bin/pip" install -q -e "$REPO_ROOT" "${JAX_SPEC:-jax[cuda12]}"
fi

if [ "$mode" = sbatch ]; then
  opts=(--nodes "$nodes" --ntasks-per-node 1 --gpus-per-node "$gpus" --job-name "$job_name")
  [ -n "$partition" ] && opts+=(--partition "$partition")
  [ -n "$time_limit" ] && opts+=(--time "$time_limit")
  [ -n "$account" ] && opts+=(--account "$account")
  exec sbatch "${opts[@]}" "$LAUNCH_DIR/run_gpu.sh" --srun -- "$@"
fi

if [ -f "$venv/bin/activate" ]; then . "$venv/bin/activate"; fi
command -v jdelta >/dev/null || die "jdelta is not on PATH: install it (launch/run_gpu.sh --install ...) or set VENV"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"

case "$mode" in
  local) exec jdelta "$@" ;;
  srun)
    export JDELTA_DISTRIBUTED=1
    exec srun --ntasks-per-node 1 --kill-on-bad-exit 1 jdelta "$@" ;;
  explicit)
    export JDELTA_DISTRIBUTED=1 JDELTA_COORDINATOR="$coordinator" JDELTA_NUM_PROCESSES="$nproc" \
      JDELTA_PROCESS_ID="$pid"
    exec jdelta "$@" ;;
esac
