"""Pieces the benchmark modes share: arguments, table presets, synthetic batches, threads."""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from benchmarks import report
from deepfm_dist.config import Config, ConfigError, load_config
from deepfm_dist.data.batch import Batch

KAGGLE_CARDINALITIES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
    5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]
"""Rows per table of Criteo Kaggle (Display Advertising Challenge), C1..C26, as in TorchRec's
DLRM example (``--num_embeddings_per_feature``): 33,762,577 rows in all."""

TABLE_PRESETS = ("config", "kaggle")

BENCH_DEFAULTS = ["--train.tensorboard=false", "--train.progress=false"]
"""Overrides every benchmark applies before the user's (no TensorBoard files, no progress bar)."""


def add_common_args(parser: argparse.ArgumentParser, *, warmup: int, steps: int) -> None:
    parser.add_argument("--warmup", type=int, default=warmup, help=f"steps not measured (default {warmup})")
    parser.add_argument("--steps", type=int, default=steps, help=f"measured steps (default {steps})")
    parser.add_argument("--tables", choices=TABLE_PRESETS, default="config",
                        help="table sizes: as configured (default: 26 x data.num_embeddings), or "
                             "kaggle (the 26 Criteo Kaggle cardinalities, 33.8M rows)")
    parser.add_argument("--out", help=f"JSON file to write (default: {os.path.join('runs', 'bench')}/MODE_wsN_TIME.json)")


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, Config]:
    """Benchmark options, then ``--config FILE`` / ``--section.key=value`` for the run's Config."""
    args, rest = parser.parse_known_args(argv)
    overrides = list(BENCH_DEFAULTS)
    if args.tables == "kaggle":
        overrides.append("--data.num_embeddings_per_feature=" + ",".join(map(str, KAGGLE_CARDINALITIES)))
    try:
        cfg = load_config(overrides + rest)
    except ConfigError as e:
        parser.error(f"{e} (benchmark options are listed above; config keys look like --section.key=value)")
    return args, cfg


def set_threads(requested: int) -> int:
    """One process using ``requested`` intra-op threads (0: every core)."""
    threads = requested or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def pick_single_device(cfg: Config) -> torch.device:
    """The device of a one-process benchmark: the first GPU when ``train.device`` allows it."""
    if cfg.train.device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", 0)
    if cfg.train.device == "cuda":
        raise SystemExit("train.device='cuda' but no CUDA device is visible")
    return torch.device("cpu")


def synthetic_batches(cfg: Config, count: int, batch_size: int, seed: int) -> list[Batch]:
    """``count`` Criteo-shaped training batches, as the Parquet loader yields them.

    Dense columns: ``log1p`` of exponential counts; one id per row and sparse column, drawn
    from a Zipf(1.2) law over ranks (the synthetic data set's) scattered over the table; labels
    with a 25% positive rate. Ids never exceed the column's table size.
    """
    rng = np.random.default_rng(seed)
    sizes = cfg.data.table_sizes()
    out = []
    for _ in range(count):
        dense = np.log1p(rng.exponential(5.0, size=(batch_size, len(cfg.data.dense)))).astype(np.float32)
        ids = []
        for feature in cfg.data.sparse:
            n = sizes[feature]
            ranks = rng.zipf(1.2, size=batch_size).astype(np.uint64)
            ids.append((1 + (ranks * np.uint64(2654435761)) % np.uint64(n - 1)).astype(np.int64))
        values = torch.from_numpy(np.concatenate(ids))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=list(cfg.data.sparse),
            values=values,
            lengths=torch.ones(len(cfg.data.sparse) * batch_size, dtype=torch.int32),
        )
        out.append(Batch(
            dense_features=torch.from_numpy(dense),
            sparse_features=kjt,
            labels=torch.from_numpy((rng.random(batch_size) < 0.25).astype(np.float32)),
        ))
    return out


def distributed_summary(per_rank: list[dict[str, Any]], cfg: Config, threads: int | None) -> dict[str, Any]:
    """``report.summarize`` plus the run settings a step/e2e JSON carries."""
    summary = report.summarize(per_rank, cfg.train.batch_size)
    summary.update(threads_per_rank=threads, batch_size_per_rank=cfg.train.batch_size,
                   pipeline=cfg.train.pipeline, pin_cpus=cfg.train.pin_cpus)
    return summary


def run_line(env, cfg: Config, threads: int | None, warmup: int, steps: int) -> str:
    """The ``run`` line of a step/e2e report."""
    return (f"{env.world_size} rank(s) x {threads or 1} thread(s), {env.backend}, {env.device.type}; "
            f"batch {cfg.train.batch_size}/rank; {'TrainPipelineSparseDist' if cfg.train.pipeline else 'plain loop'}; "
            f"pinned: {cfg.train.pin_cpus}; {warmup} warm-up + {steps} measured steps")


def sharding_line(cfg: Config, plan_report) -> str:
    """The ``sharding`` line of a step/e2e report (rank 0's ``PlanReport``): the configured type
    and what the plan chose."""
    return f"type={cfg.sharding.type}; " + "; ".join(sorted({f"{t.sharding}/{t.kernel}" for t in plan_report.tables}))


def config_line(cfg: Config) -> str:
    sizes = list(cfg.data.table_sizes().values())
    rows = sum(sizes)
    return (f"DeepFM: {len(cfg.data.dense)} dense + {len(cfg.data.sparse)} sparse fields, dim "
            f"{cfg.model.embedding_dim}, MLP {'-'.join(map(str, cfg.model.mlp))}"
            f"{' +BN' if cfg.model.batch_norm else ''} (Linear: {cfg.model.linear_kernel}, {cfg.train.precision}), tables {rows:,} rows in all (largest {max(sizes):,}); "
            f"optimizers: {cfg.optimizer.embedding} (tables), {cfg.optimizer.dense} (dense)")
