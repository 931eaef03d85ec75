#!/usr/bin/env bash
# Benchmarks: `./launcher/bench.sh MODE [args]`, e.g.
#
#   ./launcher/bench.sh loader                        # Parquet loader vs raw pyarrow on 1M synthetic rows
#   ./launcher/bench.sh loader --data DIR --batch-size 8192 --workers 2
#
# Every mode is `python -m deepfm_dist.bench MODE`; its last output line is one JSON object.
# Knobs (environment): VENV.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash launcher/setup.sh
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

MODE="${1:-}"
case "$MODE" in
  loader)
    # One process (plus its DataLoader workers if asked): no process group needed.
    exec "$PY" -m deepfm_dist.bench "$@"
    ;;
  *)
    # Unknown or missing modes: the dispatcher prints the list of modes.
    exec "$PY" -m deepfm_dist.bench "$@"
    ;;
esac
