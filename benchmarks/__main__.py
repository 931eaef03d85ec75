"""Dispatcher: ``python -m benchmarks MODE [args]``."""

from __future__ import annotations

import importlib
import sys

MODES = {
    "loader": ("benchmarks.loader", "Parquet loader vs raw pyarrow, rows/s per process"),
    "step": ("benchmarks.step", "training steps on pre-built batches (model + sharding + comms), torchrun"),
    "e2e": ("benchmarks.e2e", "the real Trainer reading Parquet, torchrun"),
    "comm": ("benchmarks.comm", "the step's collectives alone, at the step's sizes (process group cost), torchrun"),
    "ceiling": ("benchmarks.ceiling", "the MLP alone in one process on all cores (compute ceiling)"),
    "baseline": ("benchmarks.baseline", "plain single-process PyTorch DeepFM (nn.EmbeddingBag, sparse grads)"),
    "prepare": ("benchmarks.prepare", "prepare-criteo's converter: GB/s and peak memory on a generated TSV"),
    "plans": ("benchmarks.plans", "sharding plans for Criteo 1TB on GPU clusters (deepfm-plan's function), a report"),
    "gpu_check": ("benchmarks.gpu_check", "GPU acceptance: every GPU path end to end, PASS/FAIL per check"),
    "precision": ("benchmarks.precision", "fp32 vs bf16 training runs over seeds: AUC/logloss/NE/calibration, samples/s"),
    "scale": ("benchmarks.scale", "the whole pipeline (generate, prepare, train, resume, predict, export) at a Criteo scale"),
    "quality": ("benchmarks.quality", "our DeepFM beside a hashed LR and DeepCTR-Torch's DeepFM: val quality over seeds"),
    "auc": ("benchmarks.auc", "exact evaluation metrics on rank 0 at Terabyte size: time and memory"),
    "compare": ("benchmarks.compare", "ceiling, baseline, step (1 and 2 ranks), e2e in one run; ratios vs targets"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m benchmarks MODE [args]\nmodes:\n" + "\n".join(
        f"  {name:<10} {about}" for name, (_, about) in MODES.items()
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    mode, rest = argv[0], argv[1:]
    if mode not in MODES:
        print(f"unknown benchmark mode {mode!r}; expected one of: {', '.join(MODES)}\n{usage}", file=sys.stderr)
        return 2
    module = importlib.import_module(MODES[mode][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
