#!/usr/bin/env bash
# Benchmarks: `./launcher/bench.sh MODE [args]`, e.g.
#
#   ./launcher/bench.sh loader                        # Parquet loader vs raw pyarrow on 1M synthetic rows
#   ./launcher/bench.sh loader --data DIR --batch-size 8192 --workers 2
#   ./launcher/bench.sh step                          # training steps on pre-built batches, NPROC ranks
#   ./launcher/bench.sh e2e                           # the real Trainer on the synthetic Parquet set
#   ./launcher/bench.sh comm                          # the step's collectives alone (process group cost)
#   ./launcher/bench.sh ceiling                       # the MLP alone, one process, every core
#   ./launcher/bench.sh baseline                      # plain single-process PyTorch DeepFM
#   ./launcher/bench.sh precision --seeds 0,1,2       # fp32 vs bf16 training runs: quality over seeds, samples/s
#   ./launcher/bench.sh quality --data DIR            # ours vs hashed LR vs DeepCTR-Torch DeepFM, over seeds
#   ./launcher/bench.sh scale --scale 0.1             # generate -> prepare -> train -> resume -> predict -> export
#   ./launcher/bench.sh compare                       # all of the above + Kaggle-sized memory run; ratios vs targets
#   NPROC=1 ./launcher/bench.sh step --tables kaggle --sharding.type=table_wise
#
# Every mode is `python -m benchmarks MODE`; its last output line is one JSON object.
# step/e2e/comm run under torchrun (NPROC ranks; default: one per GPU, else 2 CPU ranks); the others
# are one process. --section.key=value overrides go to the run's config.
# Knobs (environment): VENV, NPROC (step/e2e), SYNTHETIC_DIR (the e2e data set, made once).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash launcher/setup.sh
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
source "$ROOT/launcher/common.sh"  # malloc settings for every rank; shared steps

require_int NPROC 1
MODE="${1:-}"
# e2e and compare read the default preset's synthetic Parquet set; make it once (as train.sh does).
if [[ "$MODE" == "e2e" || "$MODE" == "compare" || "$MODE" == "precision" ]] &&
   [[ " $* " != *" --data.train"* && " $* " != *" --data "* ]]; then
  ensure_synthetic_data "$PY"
fi
case "$MODE" in
  step|e2e|comm)
    # One rank per GPU, else 2 CPU ranks; ranks x threads <= cores (set_cpu_threads).
    NPROC="${NPROC:-$(default_nproc "$PY" 2)}"
    export_omp_threads "$NPROC" "$(nproc)"
    exec "$VENV/bin/torchrun" --standalone --nnodes=1 --nproc_per_node="$NPROC" --local-ranks-filter=0 \
      -m benchmarks "$@"
    ;;
  precision)
    # Whole training runs (torchrun, NPROC ranks each), fp32 and bf16 over seeds.
    NPROC="${NPROC:-$(default_nproc "$PY" 2)}"
    export_omp_threads "$NPROC" "$(nproc)"
    exec "$PY" -m benchmarks "$@" --nproc "$NPROC"
    ;;
  quality)
    # Our runs go through launcher/train.sh (NPROC ranks); the reference models run in this process.
    NPROC="${NPROC:-$(default_nproc "$PY" 2)}"
    exec "$PY" -m benchmarks "$@" --nproc "$NPROC"
    ;;
  scale)
    # Each stage is its own command (console scripts, launcher/train.sh, torchrun) with NPROC ranks.
    NPROC="${NPROC:-$(default_nproc "$PY" 2)}"
    exec "$PY" -m benchmarks "$@" --nproc "$NPROC"
    ;;
  ceiling|baseline|compare)
    # One process on every core (compare starts its own torchrun for the distributed runs).
    exec "$PY" -m benchmarks "$@"
    ;;
  loader)
    # One process (plus its DataLoader workers if asked): no process group needed.
    exec "$PY" -m benchmarks "$@"
    ;;
  *)
    # Unknown or missing modes: the dispatcher prints the list of modes.
    exec "$PY" -m benchmarks "$@"
    ;;
esac
