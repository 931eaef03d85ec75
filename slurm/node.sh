#!/usr/bin/env bash
# One Slurm task per node runs this: a torchrun agent that joins the job's c10d rendezvous on
# the head node and starts this node's ranks. Called by slurm/train.sbatch through srun.
#
# Knobs (environment): HEAD_NODE (set by train.sbatch), MASTER_PORT (default 29500),
# NPROC_PER_NODE (default: GPUs on this node, else CPU_RANKS_PER_NODE, default 2),
# MAX_RESTARTS (torchrun elastic restarts, default 3), RUN_DIR, CONFIG, VENV.
# Arguments are passed through to deepfm_dist.train.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"
source "$ROOT/launcher/common.sh"  # malloc settings for every rank; shared steps
: "${HEAD_NODE:?HEAD_NODE must be set (slurm/train.sbatch sets it)}"
: "${SLURM_NNODES:?not inside a Slurm allocation (SLURM_NNODES unset)}"
: "${SLURM_JOB_ID:?not inside a Slurm allocation (SLURM_JOB_ID unset)}"

require_int NPROC_PER_NODE 1
require_int CPU_RANKS_PER_NODE 1
require_int MAX_RESTARTS 0
require_int MASTER_PORT 1 65535
NPROC_PER_NODE="${NPROC_PER_NODE:-$(default_nproc "$VENV/bin/python" "${CPU_RANKS_PER_NODE:-2}")}"
# Ranks x threads must not exceed the cores given to this task.
export_omp_threads "$NPROC_PER_NODE" "${SLURM_CPUS_ON_NODE:-$(nproc)}"

CONFIG_ARGS=()
if [[ -n "${CONFIG:-}" ]]; then CONFIG_ARGS=(--config "$CONFIG"); fi

# --resume: a requeued job (same SLURM_JOB_ID, so the same RUN_DIR) continues from its latest
# checkpoint; a fresh job finds none and starts from scratch.
# run_agent (launcher/common.sh): Slurm's --signal=TERM@300 goes to the ranks, not the agent.
run_agent "$VENV/bin/torchrun" \
  --nnodes="$SLURM_NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$HEAD_NODE:${MASTER_PORT:-29500}" --rdzv_id="$SLURM_JOB_ID" \
  --max-restarts="${MAX_RESTARTS:-3}" \
  -m deepfm_dist.train "${CONFIG_ARGS[@]}" --run_dir="${RUN_DIR:-runs/slurm-$SLURM_JOB_ID}" --resume "$@"
