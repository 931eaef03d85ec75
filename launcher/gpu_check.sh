#!/usr/bin/env bash
# GPU acceptance: on a machine with GPUs, one command (under 10 minutes) that installs the GPU
# stack, then runs the GPU path end to end and reports PASS/FAIL per check (environment, the
# default run on every visible GPU, the pipeline's CUDA streams, bf16, fp16/bf16 quantized
# comms, Adam resume bitwise, a CPU checkpoint resumed on GPU, UVM caching, predict and export, samples/s per
# GPU at batch 8192 and 65536). Results: runs/gpu_check/gpu_check.json and a table.
#
#   ./launcher/gpu_check.sh                       # every check, every visible GPU
#   ./launcher/gpu_check.sh --dry-run             # anywhere: list and verify, start nothing on a GPU
#   ./launcher/gpu_check.sh --only default_run,bf16 --out /scratch/gpu_check
#   WHEELHOUSE=/shared/wheels ./launcher/gpu_check.sh   # without network (launcher/setup.sh --download)
#
# Knobs (environment): WHEELHOUSE, TORCH_INDEX_URL, USE_SYSTEM_TORCH (launcher/setup.sh), VENV,
# SYNTHETIC_DIR. The install flavour is gpu unless --dry-run or FBGEMM_FLAVOR says otherwise.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=0
for arg in "$@"; do
  case "$arg" in --dry-run) DRY=1 ;; esac
done
# The install step: the GPU flavour on a GPU machine (setup.sh stops if CUDA is not usable);
# a dry run verifies the install this machine gets.
if [[ "$DRY" -eq 1 ]]; then
  bash launcher/setup.sh
else
  FBGEMM_FLAVOR="${FBGEMM_FLAVOR:-gpu}" bash launcher/setup.sh
fi
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
source "$ROOT/launcher/common.sh"
if [[ "$DRY" -eq 0 ]]; then
  ensure_synthetic_data "$PY"  # the default preset's data set, made once
fi
exec "$PY" -m benchmarks gpu_check "$@"
