"""The collectives of one training step alone, at the step's sizes: what the process group costs.

    torchrun --nproc_per_node=2 -m benchmarks comm [--warmup 10] [--steps 100]
        [--section.key=value ...]

A table-wise step exchanges, per rank: three small all-to-alls (the input dist's splits, KJT
lengths and ids), the pooled embeddings forward and their gradients backward (B x K x W fp32:
the per-rank batch, the sparse fields, the table row width), and one all-reduce of the dense
gradients (the model's dense parameters, DDP's bucket). Each is timed here on its own, on the
transport the sharded model uses (``sharding.intra_node_comm``: all-to-alls on gloo and the
all-reduce on shared memory by default on CPU, both on shared memory with ``sharding.shm_all_to_all``;
NCCL on GPU), with the ranks set up as in training (threads, pinning; CUDA synchronised before the clock),
as a mean over ``--steps`` calls after ``--warmup``. ``samples_per_s`` in the JSON line is what a
step would reach if it did nothing but these collectives, back to back on otherwise idle cores:
an upper bound for the process group, to compare with ``step`` (see
benchmarks/cpu-2core_202612.md, where gloo over loopback TCP costs 5.6-6.4 ms of a ~55 ms step
this way, and about twice that inside the step).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
import torch.distributed as dist

from benchmarks import report
from benchmarks.common import add_common_args, parse
from deepfm_dist.distributed import shm
from deepfm_dist.distributed.env import destroy, init_distributed, setup_cpu_rank
from deepfm_dist.distributed.sharding import transport as model_transport
from deepfm_dist.model.build import build_deepfm
from deepfm_dist.model.deepfm import table_dim


def step_collectives(cfg, world: int) -> list[tuple[str, str, int, int, torch.dtype]]:
    """(name, kind, count per step, numel per rank, dtype) of a table-wise step's collectives."""
    batch, fields = cfg.train.batch_size, len(cfg.data.sparse)
    model = build_deepfm(cfg, table_device="meta")  # tables on meta: only the dense part is real
    dense = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("sparse_fields."))
    return [
        ("input dist: splits", "all_to_all", 1, world * 2, torch.int64),
        ("input dist: lengths", "all_to_all", 1, batch * fields, torch.int32),
        ("input dist: ids", "all_to_all", 1, batch * fields, torch.int64),
        ("pooled embeddings (fwd, bwd)", "all_to_all", 2, batch * fields * table_dim(cfg.model.embedding_dim),
         torch.float32),
        ("dense gradients (DDP bucket)", "all_reduce", 1, dense, torch.float32),
    ]


def time_collective(kind: str, numel: int, dtype: torch.dtype, world: int, device: torch.device, warmup: int,
                    steps: int, group, hook_state=None) -> list[float]:
    per = max(1, numel // world)
    x = torch.ones(per * world, device=device, dtype=dtype)
    y = torch.empty_like(x)
    if kind == "all_to_all":
        def run():
            dist.all_to_all_single(y, x, group=group)
    elif hook_state is not None:  # DDP's comm hook: shared memory, the stock group for oversized buckets
        def run():
            if not shm.allreduce_sum_(hook_state.segments, x):
                dist.all_reduce(x, group=group)
    else:
        def run():
            dist.all_reduce(x, group=group)
    for _ in range(warmup):
        run()
    dist.barrier()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench comm", description=__doc__.split("\n\n")[0])
    add_common_args(parser, warmup=10, steps=100)
    args, cfg = parse(parser, list(argv or []))
    env = init_distributed(cfg.train.device)
    try:
        threads, _ = setup_cpu_rank(env, cfg.train.threads, cfg.train.pin_cpus)
        # The group the sharded model would use (sharding.intra_node_comm).
        comm = model_transport(cfg, env)
        group, hook_state, transport = comm.group, comm.wrapper.hook_state, comm.description
        rows, step_s = [], 0.0
        for name, kind, count, numel, dtype in step_collectives(cfg, env.world_size):
            times = time_collective(kind, numel, dtype, env.world_size, env.device, args.warmup, args.steps, group,
                                   hook_state)
            # Every rank's mean; the slowest decides (a collective ends when its last rank does).
            mean = torch.tensor([sum(times) / len(times)], dtype=torch.float64)
            if env.world_size > 1:
                dist.all_reduce(mean, op=dist.ReduceOp.MAX)
            ms = mean.item() * 1e3
            step_s += count * ms / 1e3
            rows.append((name, kind, count, numel * dtype.itemsize, ms, report.percentile_ms(times, 50), report.percentile_ms(times, 90)))
        peaks = report.gather_ranks({"peak_rss_mb": report.peak_rss_mb()})
        gc.collect()
        if env.is_main:
            per_rank = cfg.train.batch_size / step_s if step_s > 0 else 0.0
            summary = {
                "samples_per_s": per_rank * env.world_size, "samples_per_s_per_rank": per_rank,
                "step_ms_p50": step_s * 1e3, "step_ms_p90": step_s * 1e3, "data_wait_ms_per_step": 0.0,
                "peak_rss_mb": max(p["peak_rss_mb"] for p in peaks),
                "peak_rss_mb_per_rank": [round(p["peak_rss_mb"], 1) for p in peaks],
                "collectives_ms_per_step": step_s * 1e3, "threads_per_rank": threads, "backend": env.backend,
                "transport": transport,
                "collectives": [{"name": r[0], "kind": r[1], "per_step": r[2], "bytes": r[3], "ms_mean": r[4],
                                 "ms_p50": r[5], "ms_p90": r[6]} for r in rows],
            }
            table = "\n".join(
                [f"{'collective':<30} {'kind':<11} {'per step':>8} {'bytes':>12} {'ms mean':>8} {'p50':>7} {'p90':>7}"]
                + [f"{r[0]:<30} {r[1]:<11} {r[2]:>8} {r[3]:>12,} {r[4]:>8.3f} {r[5]:>7.3f} {r[6]:>7.3f}" for r in rows]
                + [f"{'one step (sum x per step)':<30} {'':<11} {'':>8} {'':>12} {step_s * 1e3:>8.3f}"])
            setup = [("run", f"{env.world_size} rank(s) x {threads or 1} thread(s), {transport}, {env.device.type}; "
                             f"pinned: {cfg.train.pin_cpus}; batch {cfg.train.batch_size}/rank; "
                             f"{args.warmup} warm-up + {args.steps} timed calls per collective")]
            report.emit("comm", env.world_size, summary=summary, per_rank=None, setup=setup,
                        config=cfg.to_dict(), out=args.out, table=table)
    finally:
        destroy()
    return 0
