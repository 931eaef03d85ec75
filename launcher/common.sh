# shellcheck shell=bash
# Sourced by the launchers (train.sh, bench.sh, slurm/node.sh): process-level settings every
# rank should start with. Values already in the environment win.
#
# glibc malloc keeps freed memory (up to 4 GiB) instead of returning it: without this, every
# multi-MB activation of a step is a fresh mmap and munmap, ~2,000 page faults (~3.7 ms of
# kernel time) per step and rank on CPU. Measured: +8% per training step, peak RSS unchanged
# (benchmarks/cpu-2core_202611.md). Mirrors deepfm_dist/bench/compare.py:MALLOC_ENV.
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-33554432}"
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-4294967296}"
