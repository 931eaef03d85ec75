#!/usr/bin/env bash
# Day-by-day training with progressive validation (deepfm_dist/days.py): train on day k from day
# k-1's model, evaluate on day k+1; the days' AUC, logloss, NE and calibration in RUN_DIR/days.json.
#
#   ./launcher/days.sh --days 0-22 --day-glob 'data/criteo_tb/train/*-day_{day}.*.parquet' \
#       --run-dir runs/days -- --config criteo_1tb
#
# Arguments after -- go to every day's ./launcher/train.sh run (NPROC, CONFIG ... apply too).
# Rerunning the same command continues after the last finished day. Knobs (environment): VENV.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash launcher/setup.sh
VENV="${VENV:-$ROOT/.venv}"
exec "$VENV/bin/python" -m deepfm_dist.days "$@"
