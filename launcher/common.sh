# shellcheck shell=bash
# Sourced by the launchers (train.sh, bench.sh, slurm/node.sh): process-level settings every
# rank should start with, and the steps they share. Values already in the environment win.
#
# glibc malloc keeps freed memory (up to 4 GiB) instead of returning it: without this, every
# multi-MB activation of a step is a fresh mmap and munmap, ~2,000 page faults (~3.7 ms of
# kernel time) per step and rank on CPU. Measured: +8% per training step, peak RSS unchanged
# (benchmarks/cpu-2core_202611.md). Mirrors deepfm_dist/bench/compare.py:MALLOC_ENV.
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-33554432}"
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-4294967296}"

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
