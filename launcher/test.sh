#!/usr/bin/env bash
# Set up the environment (launcher/setup.sh), then run the whole test suite.
# Arguments are passed to pytest, e.g. ./launcher/test.sh -k sharded -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash launcher/setup.sh
VENV="${VENV:-$ROOT/.venv}"
# One intra-op thread per process: the suite starts 2-rank jobs on 2-core machines.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
