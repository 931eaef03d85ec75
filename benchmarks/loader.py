"""Loader benchmark: the same files and columns read two ways in one run.

1. raw: ``pyarrow.parquet.ParquetFile.iter_batches`` over the configured columns (the ceiling:
   decoding only, nothing converted);
2. loader: ``ParquetLoader`` up to finished ``Batch`` objects (hashing, transforms, shuffling,
   KeyedJaggedTensor).

Both are warmed up (a first pass fills the page cache and imports everything), then measured
``--repeats`` times alternately; the best pass of each counts (the machine is shared, so the
best pass is the least disturbed one). Rates are per loader process: the loader's rate is
divided by its worker processes when ``--workers`` > 0.

    python -m benchmarks loader [--data DIR] [--rows N] [--batch-size B] [--workers K]

The last output line is one JSON object with ``raw_rows_per_s``, ``loader_rows_per_s`` and
``ratio`` (loader / raw).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks import report
from deepfm_dist.config import DataConfig
from deepfm_dist.data import ParquetLoader, resolve_parquet_paths
from deepfm_dist.prepare.synthetic import generate

DEFAULT_DATA = "data/generated/bench_loader"


def _data_files(data: str | None, rows: int, row_group_size: int) -> tuple[str, str]:
    """The benchmark's (train, val) Parquet specs: ``--data`` (its train/ and val/ folders
    if it has them, else itself for both), or a generated synthetic set."""
    if data is not None:
        train, val = os.path.join(data, "train"), os.path.join(data, "val")
        if os.path.isdir(train):
            return train, val if os.path.isdir(val) else train
        return data, data
    out = Path(f"{DEFAULT_DATA}_{rows}_{row_group_size}")
    oracle = out / "oracle.json"
    if not oracle.exists() or json.loads(oracle.read_text()).get("train_rows") != rows:
        print(f"generating {rows:,} synthetic Criteo-schema rows into {out} ...", flush=True)
        generate(out, train_rows=rows, val_rows=1000, files_per_split=(4, 1),
                 row_group_size=row_group_size, seed=0)
    return str(out / "train"), str(out / "val")


def _raw_pass(files: list[str], columns: list[str], batch_rows: int) -> tuple[int, float]:
    start, rows = time.perf_counter(), 0
    for path in files:
        with pq.ParquetFile(path) as pf:
            for record_batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                rows += record_batch.num_rows
    return rows, time.perf_counter() - start


def _loader_pass(loader: ParquetLoader, epoch: int) -> tuple[int, float]:
    loader.set_epoch(epoch)
    start, rows = time.perf_counter(), 0
    for batch in loader:
        rows += batch.labels.shape[0]
    return rows, time.perf_counter() - start


def _e2e_rank(argv: list[str]) -> dict:
    """One rank of a real training run (``deepfm_dist.train.main``) whose training loader is
    watched: how long the step waited inside ``next()`` for a batch."""
    from deepfm_dist import trainer
    from deepfm_dist.train import main as train_main

    loaders: list[ParquetLoader] = []
    make = trainer.make_reader

    def watched(cfg, env, files, *, train):
        loader = make(cfg, env, files, train=train)
        if train:
            loaders.append(loader)
        return loader

    trainer.make_reader = watched  # instrumentation only: the run itself is unchanged
    summary = train_main(argv)
    return {"wait_s": sum(l.wait_seconds for l in loaders), "train_s": summary["train_seconds"],
            "steps": summary["steps"], "samples_per_s": summary["train_samples_per_s"]}


def _e2e(train: str, val: str, args: argparse.Namespace, extra: list[str]) -> dict:
    """A 2-rank CPU training run (gloo, real processes) on the benchmark data; returns the
    time the training step spent waiting for batches as a share of the step time."""
    import socket
    import tempfile
    import uuid

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run_dir = tempfile.mkdtemp(prefix="bench_e2e_")
    argv = [f"--data.train={train}", f"--data.val={val}", f"--run_dir={run_dir}",
            f"--train.batch_size={args.e2e_batch_size}", f"--train.max_steps={args.e2e_steps}",
            f"--data.num_workers={args.workers}", "--train.progress=false", *extra]
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=0,
                          start_method="spawn")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 ranks x 1 thread on 2 cores
    results = elastic_launch(config, _e2e_rank)(argv)
    return {rank: {**r, "wait_share": r["wait_s"] / r["train_s"]} for rank, r in sorted(results.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench loader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a folder (its train/ if present), file or glob of Parquet "
                        "with the Criteo columns; default: a generated synthetic set")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows to generate (default 1000000)")
    parser.add_argument("--row-group-size", type=int, default=65_536,
                        help="rows per row group of the generated set (default 65536)")
    parser.add_argument("--batch-size", type=int, default=8192, help="loader batch size (default 8192)")
    parser.add_argument("--workers", type=int, default=0, help="data.num_workers (default 0)")
    parser.add_argument("--prefetch", type=int, default=DataConfig.prefetch, help="data.prefetch")
    parser.add_argument("--shuffle-buffer", type=int, default=DataConfig.shuffle_buffer,
                        help="data.shuffle_buffer")
    parser.add_argument("--no-shuffle", action="store_true", help="data.shuffle=false")
    parser.add_argument("--vocab", metavar="DIR", help="also time the loader mapping ids through this vocabulary "
                        "(data.vocab; prepare-criteo --vocab-threshold output) instead of hashing, alternating")
    parser.add_argument("--repeats", type=int, default=5, help="measured passes of each (default 5)")
    parser.add_argument("--e2e", action="store_true",
                        help="also run a 2-rank CPU training on the data and report the share of "
                             "step time spent waiting for the next batch")
    parser.add_argument("--e2e-steps", type=int, default=200, help="training steps of --e2e (default 200)")
    parser.add_argument("--e2e-batch-size", type=int, default=2048, help="per-rank batch of --e2e (default 2048)")
    args, extra = parser.parse_known_args(argv)
    if extra and not args.e2e:
        parser.error(f"unrecognized arguments: {' '.join(extra)} (--section.key=value only with --e2e)")

    train_spec, val_spec = _data_files(args.data, args.rows, args.row_group_size)
    files = resolve_parquet_paths(train_spec, "--data")
    cfg = DataConfig(train=files, val=files, shuffle=not args.no_shuffle, num_workers=args.workers,
                     prefetch=args.prefetch, shuffle_buffer=args.shuffle_buffer)
    columns = [cfg.label, *cfg.dense, *cfg.sparse]
    loader = ParquetLoader(files, cfg, batch_size=args.batch_size, rank=0, world_size=1,
                           train=True, seed=0)
    meta = pq.ParquetFile(files[0]).metadata
    rg_rows = meta.row_group(0).num_rows if meta.num_row_groups else 0

    # Warm-up: page cache, imports, allocator.
    _raw_pass(files, columns, args.row_group_size)
    _loader_pass(loader, 0)
    vocab_loader = None
    if args.vocab:
        from dataclasses import replace

        from deepfm_dist.data.vocab import resolve

        vocab_loader = ParquetLoader(files, resolve(replace(cfg, vocab=args.vocab)), batch_size=args.batch_size,
                                     rank=0, world_size=1, train=True, seed=0)
        _loader_pass(vocab_loader, 0)
    raw_runs, loader_runs, vocab_runs = [], [], []
    for r in range(args.repeats):
        raw_runs.append(_raw_pass(files, columns, args.row_group_size))
        loader_runs.append(_loader_pass(loader, r + 1))
        if vocab_loader is not None:
            vocab_runs.append(_loader_pass(vocab_loader, r + 1))
    raw_rows, loader_rows = raw_runs[0][0], loader_runs[0][0]
    raw_rate = max(n / s for n, s in raw_runs)
    processes = max(1, args.workers)
    loader_rate = max(n / s for n, s in loader_runs) / processes
    ratio = loader_rate / raw_rate

    rows = [
        ("hardware", report.hardware_line(report.hardware())),
        ("versions", ", ".join(f"{k} {v}" for k, v in report.versions().items())),
        ("commit", report.git_commit()),
        ("data", f"{len(files)} files, {loader.num_rows:,} rows, row groups of {rg_rows:,}, "
                 f"columns: label + {len(cfg.dense)} dense + {len(cfg.sparse)} sparse (Criteo schema)"),
        ("loader config", f"batch {args.batch_size}, workers {args.workers}, prefetch {args.prefetch}, "
                          f"shuffle {not args.no_shuffle} (buffer {args.shuffle_buffer:,} rows)"),
        ("passes", f"1 warm-up + {args.repeats} measured of each, alternating; best pass counts"),
    ]
    print("\n".join(f"{k:<14} {v}" for k, v in rows))
    print()
    print(f"{'reader':<34} {'rows/pass':>12} {'best s':>8} {'rows/s/process':>16} {'vs raw':>7}")
    print(f"{'raw pyarrow iter_batches':<34} {raw_rows:>12,} {min(s for _, s in raw_runs):>8.3f} "
          f"{raw_rate:>16,.0f} {1.0:>7.2f}")
    print(f"{'ParquetLoader -> Batch':<34} {loader_rows:>12,} {min(s for _, s in loader_runs):>8.3f} "
          f"{loader_rate:>16,.0f} {ratio:>7.2f}")
    if vocab_runs:
        vocab_rate = max(n / s for n, s in vocab_runs) / processes
        print(f"{'ParquetLoader, data.vocab':<34} {vocab_runs[0][0]:>12,} {min(s for _, s in vocab_runs):>8.3f} "
              f"{vocab_rate:>16,.0f} {vocab_rate / raw_rate:>7.2f}")
    result = {
        "raw_rows_per_s": round(raw_rate),
        "loader_rows_per_s": round(loader_rate),
        "ratio": round(ratio, 3),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "shuffle": not args.no_shuffle,
        "rows": loader_rows,
    }
    if vocab_runs:
        result["loader_vocab_rows_per_s"] = round(vocab_rate)
    if args.e2e:
        e2e = _e2e(train_spec, val_spec, args, extra)
        print()
        print(f"end-to-end: 2 CPU ranks (gloo), batch {args.e2e_batch_size}/rank, {args.e2e_steps} steps, "
              f"workers {args.workers}{' ' + ' '.join(extra) if extra else ''}")
        print(f"{'rank':<6} {'steps':>6} {'step time s':>12} {'waiting for data s':>19} {'share':>7} {'samples/s':>11}")
        for rank, r in e2e.items():
            print(f"{rank:<6} {r['steps']:>6} {r['train_s']:>12.2f} {r['wait_s']:>19.3f} "
                  f"{100 * r['wait_share']:>6.2f}% {r['samples_per_s']:>11,.0f}")
        result["e2e_wait_share"] = round(max(r["wait_share"] for r in e2e.values()), 4)
    print(json.dumps(result))
    return 0
