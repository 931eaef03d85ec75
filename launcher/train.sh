#!/usr/bin/env bash
# Train DeepFM with torchrun on this node.
#
#   ./launcher/train.sh                       # embedded default on a generated synthetic set
#   ./launcher/train.sh --train.epochs=2      # any --section.key=value is passed through
#   NPROC=4 CONFIG=my.toml ./launcher/train.sh
#
# Knobs (environment): NPROC (ranks; default: one per GPU, else 2 CPU ranks), CONFIG (TOML
# preset; default: the embedded deepfm_dist/configs/default.toml), MASTER_PORT (default: a free port),
# LOG_RANK (rank whose output torchrun shows; default 0), SYNTHETIC_DIR, SYNTHETIC_TRAIN_ROWS,
# SYNTHETIC_VAL_ROWS (the default data set, generated once when absent), MAX_RESTARTS (torchrun
# restarts the ranks after a failure, resuming from the latest checkpoint; default 0),
# GLOO_SOCKET_IFNAME (default lo: this node's ranks talk over loopback only), VENV.
# SIGTERM / SIGUSR1 to this script: the ranks checkpoint at their next step and exit 0.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash launcher/setup.sh
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
source "$ROOT/launcher/common.sh"  # malloc settings for every rank; shared steps

require_int NPROC 1
require_int MAX_RESTARTS 0
require_int MASTER_PORT 1 65535
NPROC="${NPROC:-$(default_nproc "$PY" 2)}"
require_int LOG_RANK 0 $((NPROC - 1))
# --standalone picks a free port; MASTER_PORT pins one (e.g. when several jobs share a node).
RDZV_ARGS=(--standalone)
if [[ -n "${MASTER_PORT:-}" ]]; then RDZV_ARGS=(--master_addr=127.0.0.1 --master_port="$MASTER_PORT"); fi
LOG_RANK="${LOG_RANK:-0}"
# One node: the ranks' gloo sockets listen on loopback only (gloo binds to the address the host
# name resolves to otherwise, which may face the network). torchrun's own stores still listen on
# every interface: torch 2.13 has no bind address for them (see README, Security).
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
# train.threads can still override the threads per run.
export_omp_threads "$NPROC" "$(nproc)"
CONFIG_ARGS=()
if [[ -n "${CONFIG:-}" ]]; then CONFIG_ARGS=(--config "$CONFIG"); fi

# Help, and a bad key or value: answered once, here, before torchrun starts any rank (exit 2).
for arg in "$@"; do
  case "$arg" in -h|--help|--help-keys) exec "$PY" -m deepfm_dist.train "$@" ;; esac
done
"$PY" -m deepfm_dist.train --check-config "${CONFIG_ARGS[@]}" "$@"

# The default preset reads data/generated/synthetic; make it once if it is not there.
if [[ -z "${CONFIG:-}" ]]; then ensure_synthetic_data "$PY"; fi

run_agent "$VENV/bin/torchrun" "${RDZV_ARGS[@]}" --nnodes=1 --nproc_per_node="$NPROC" \
  --max-restarts="${MAX_RESTARTS:-0}" --local-ranks-filter="$LOG_RANK" \
  -m deepfm_dist.train "${CONFIG_ARGS[@]}" "$@"
