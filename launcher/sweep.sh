#!/usr/bin/env bash
# Hyperparameter sweep (deepfm_dist/sweep.py): a grid or random search over config keys, each
# trial an ordinary ./launcher/train.sh run per seed; results ranked by a validation metric in
# OUT/results.md, the best configuration in OUT/best.toml.
#
#   ./launcher/sweep.sh --out runs/sweep --grid optimizer.embedding_lr=0.01,0.02,0.05 \
#       --grid model.batch_norm=true,false --seeds 0,1,2 -- --train.epochs=1
#
# Arguments after -- go to every run (NPROC, CONFIG ... apply too). Rerunning the same command
# skips the runs that finished. Knobs (environment): VENV.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash launcher/setup.sh
VENV="${VENV:-$ROOT/.venv}"
exec "$VENV/bin/python" -m deepfm_dist.sweep "$@"
