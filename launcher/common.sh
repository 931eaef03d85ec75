# shellcheck shell=bash
# Sourced by the launchers (train.sh, bench.sh, slurm/node.sh): process-level settings every
# rank should start with, and the steps they share. Values already in the environment win.
#
# The one place for the malloc settings. glibc malloc keeps freed memory (up to 4 GiB) instead of
# returning it: without this, every multi-MB activation of a step is a fresh mmap and munmap,
# thousands of page faults per step and rank on CPU (figures: benchmarks/cpu-2core_202611.md).
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-33554432}"
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-4294967296}"

# A torchrun agent that receives a stop signal itself (Slurm's --signal reaches every process of
# the job step, the agent included) passes it to its ranks, then kills them after this many
# seconds whatever they are doing. torch's default, 30 s, is shorter than writing a checkpoint of
# large GPU tables; the ranks stop at their next step, so leave them most of Slurm's 300 s warning.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}"

# require_int NAME MIN [MAX]: the knob NAME, if set and not empty, must be an integer in [MIN, MAX]; anything
# else ends the launcher with one line naming the knob, exit 2 (as a bad config key does), before
# it divides by it or hands it to torchrun.
require_int() {
  local value="${!1-}"
  [[ -z "$value" ]] && return 0
  if [[ ! "$value" =~ ^[0-9]{1,9}$ ]] || ((10#$value < $2)) || { [[ -n "${3:-}" ]] && ((10#$value > $3)); }; then
    echo "$(basename "$0"): $1=${value@Q}: expected an integer >= $2${3:+ and <= $3}" >&2
    exit 2
  fi
}

# default_nproc PYTHON CPU_RANKS: ranks for this node, one per visible GPU, else CPU_RANKS.
default_nproc() {
  local ngpu
  ngpu="$("$1" -c 'import torch; print(torch.cuda.device_count())')"
  if [[ "$ngpu" -gt 0 ]]; then echo "$ngpu"; else echo "$2"; fi
}

# export_omp_threads RANKS CORES: one OpenMP pool per rank sized to its share of the cores
# (ranks x threads <= cores: oversubscription more than halves CPU throughput).
export_omp_threads() {
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $2 / $1 > 0 ? $2 / $1 : 1 ))}"
}

# ensure_synthetic_data PYTHON: the default preset's data set (data/generated/synthetic, or
# SYNTHETIC_DIR; SYNTHETIC_TRAIN_ROWS / SYNTHETIC_VAL_ROWS rows), generated once when absent.
ensure_synthetic_data() {
  local dir="${SYNTHETIC_DIR:-data/generated/synthetic}"
  if [[ ! -f "$dir/oracle.json" ]]; then
    "$1" data/make_synthetic.py --out "$dir" \
      --train-rows "${SYNTHETIC_TRAIN_ROWS:-1000000}" --val-rows "${SYNTHETIC_VAL_ROWS:-100000}"
  fi
}

# run_agent CMD...: run a torchrun agent and pass SIGTERM / SIGUSR1 (Slurm's warning, a user's
# `kill`) to its ranks instead of to the agent. The ranks agree on the stop at their next step,
# write a checkpoint and exit 0, so the agent ends normally; an agent that receives the signal
# itself raises, kills the ranks after TORCH_ELASTIC_SHUTDOWN_TIMEOUT (above) whatever they are
# writing, and exits 1 with a traceback. Returns the agent's exit status and, after a signal, says in
# one line what happened.
run_agent() {
  # Each failing rank appends its exception here (deepfm_dist/train.py: record_failure).
  DEEPFM_FAILURE_FILE="$(mktemp "${TMPDIR:-/tmp}/deepfm-failures.XXXXXX")"
  export DEEPFM_FAILURE_FILE
  "$@" &
  AGENT_PID=$!
  STOP_SIGNAL=""
  trap 'STOP_SIGNAL=TERM; pkill -TERM -P "$AGENT_PID" || true' TERM
  trap 'STOP_SIGNAL=USR1; pkill -USR1 -P "$AGENT_PID" || true' USR1
  local rc
  while true; do
    rc=0
    wait "$AGENT_PID" || rc=$?
    # wait returns early when a trapped signal arrives: keep waiting while the agent runs.
    if ! kill -0 "$AGENT_PID" 2>/dev/null; then break; fi
  done
  trap - TERM USR1
  if [[ "$rc" -ne 0 && -s "$DEEPFM_FAILURE_FILE" ]]; then
    # The root cause first (a rank's own error), then ranks that only lost a failed peer.
    echo "deepfm: the run failed (exit $rc):" >&2
    { grep '^cause' "$DEEPFM_FAILURE_FILE" || true; grep '^peer' "$DEEPFM_FAILURE_FILE" | sed 's/^peer\t/peer\t(then) /' || true; } \
      | cut -f2- | awk '!seen[$0]++' | sed 's/^/  /' >&2
  fi
  rm -f "$DEEPFM_FAILURE_FILE"
  if [[ -n "$STOP_SIGNAL" ]]; then
    if [[ "$rc" -eq 0 ]]; then
      echo "deepfm: SIG$STOP_SIGNAL received: the ranks wrote a checkpoint and stopped; continue with --resume" >&2
    else
      echo "deepfm: SIG$STOP_SIGNAL received, and the ranks did not stop cleanly (exit $rc); see above" >&2
    fi
  fi
  return "$rc"
}
