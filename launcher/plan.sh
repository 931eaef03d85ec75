#!/usr/bin/env bash
# The sharding plan a configuration gets on a cluster, before any job runs (no GPU needed):
#
#   ./launcher/plan.sh --config criteo_1tb --hardware h100-80g --nodes 2
#   ./launcher/plan.sh --world-size 2 --device cpu          # what ./launcher/train.sh gets here
#   ./launcher/plan.sh --config my.toml --hardware a100-80g --world-size 64 --json plan.json
#
# Arguments go to deepfm-plan (deepfm_dist/plan.py; --help lists them); exit 1 when the tables
# do not fit, with the smallest world size that does. Knobs (environment): VENV.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash launcher/setup.sh
VENV="${VENV:-$ROOT/.venv}"
exec "$VENV/bin/python" -m deepfm_dist.plan "$@"
