"""Dispatcher: ``python -m deepfm_dist.bench MODE [args]``."""

from __future__ import annotations

import importlib
import sys

MODES = {
    "loader": ("deepfm_dist.bench.loader", "Parquet loader vs raw pyarrow, rows/s per process"),
    "step": ("deepfm_dist.bench.step", "training steps on pre-built batches (model + sharding + comms), torchrun"),
    "e2e": ("deepfm_dist.bench.e2e", "the real Trainer reading Parquet, torchrun"),
    "comm": ("deepfm_dist.bench.comm", "the step's collectives alone, at the step's sizes (process group cost), torchrun"),
    "ceiling": ("deepfm_dist.bench.ceiling", "the MLP alone in one process on all cores (compute ceiling)"),
    "baseline": ("deepfm_dist.bench.baseline", "plain single-process PyTorch DeepFM (nn.EmbeddingBag, sparse grads)"),
    "compare": ("deepfm_dist.bench.compare", "ceiling, baseline, step (1 and 2 ranks), e2e in one run; ratios vs targets"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m deepfm_dist.bench MODE [args]\nmodes:\n" + "\n".join(
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
