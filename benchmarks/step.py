"""Training steps on pre-built batches: the sharded model, its optimizers and the real step
(``step.Stepper``: TrainPipelineSparseDist, or ``train_step`` one batch at a time with
``--train.pipeline=false``), with no file I/O, to isolate model + sharding + comms.

    torchrun --nproc_per_node=2 -m benchmarks step [--warmup 20] [--steps 100]
        [--tables config|kaggle] [--profile DIR] [--section.key=value ...]

Batches are Criteo-shaped (``common.synthetic_batches``), made once per rank before the
clock starts and cycled. With ``--tables kaggle`` it is also the memory benchmark: each rank
reports the bytes of its table shards and fused optimizer state next to its peak RSS, and the
bound ``1.25 x (shards + state) + 1.5 GiB``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import time

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor

from benchmarks import report
from benchmarks.common import (
    add_common_args, config_line, distributed_summary, parse, run_line, sharding_line, synthetic_batches,
)
from deepfm_dist.distributed.env import destroy, init_distributed, setup_cpu_rank
from deepfm_dist.distributed.planning import PlanReport, format_report
from deepfm_dist.distributed.sharding import shard_model
from deepfm_dist.optim import build_optimizers, lr_factor, set_learning_rates
from deepfm_dist.logs import quiet_library_noise
from deepfm_dist.step import Stepper, build_model

DISTINCT_BATCHES = 16
"""Pre-built batches per rank, cycled (distinct ids per step without holding a whole epoch)."""


def _local_bytes(value) -> int:
    if isinstance(value, ShardedTensor):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in value.local_shards())
    if isinstance(value, DTensor):
        local = value.to_local()
        return local.numel() * local.element_size()
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return 0


def memory_breakdown(model: torch.nn.Module, opts) -> dict[str, float]:
    """MiB this rank holds in table shards, fused (table) optimizer state, and dense params + state."""
    tables = sum(_local_bytes(v) for k, v in model.state_dict().items() if ".embedding_bags." in k)
    emb_state = 0
    for per_param in opts.fused.state_dict()["state"].values():
        emb_state += sum(_local_bytes(v) for v in per_param.values())
    dense = sum(p.numel() * p.element_size() for p in opts.dense_params)
    for per_param in opts.dense.state.values():
        dense += sum(_local_bytes(v) for v in per_param.values())
    mib = 2**20
    shards = (tables + emb_state) / mib
    return {
        "table_shards_mb": tables / mib,
        "table_optimizer_state_mb": emb_state / mib,
        "dense_params_and_state_mb": dense / mib,
        "rss_bound_mb": 1.25 * shards + 1.5 * 1024,
    }


def profile_steps(step, steps: int, out_dir: str, rank: int) -> str:
    """Run ``steps`` steps under torch.profiler; write a Chrome trace and an op table per rank."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=False) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - t0
    os.makedirs(out_dir, exist_ok=True)
    prof.export_chrome_trace(os.path.join(out_dir, f"trace_rank{rank}.json"))
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    with open(os.path.join(out_dir, f"ops_rank{rank}.txt"), "w") as f:
        f.write(table)
    from benchmarks.profile import breakdown

    with open(os.path.join(out_dir, f"breakdown_rank{rank}.txt"), "w") as f:
        f.write(breakdown(prof.key_averages(), steps, wall))
    return table + "\n" + breakdown(prof.key_averages(), steps, wall)


def measure(args: argparse.Namespace, cfg, env) -> tuple[list[dict], PlanReport | None, int | None]:
    """Build the sharded model and run the steps; returns (per-rank numbers, rank 0's plan report, threads).

    Everything that holds the process group (model, stepper, optimizers) lives only in here,
    so it is gone before the caller destroys the group (see trainer.train).
    """
    threads, _ = setup_cpu_rank(env, cfg.train.threads, cfg.train.pin_cpus)  # as the Trainer does
    rss_before_model = report.current_rss_mb()
    model, _, plan_report = shard_model(build_model(cfg), cfg, env)
    opts = build_optimizers(model, cfg.optimizer, cfg.train.grad_clip)
    memory = memory_breakdown(model, opts)
    batches = synthetic_batches(cfg, DISTINCT_BATCHES, cfg.train.batch_size, seed=1000 + env.rank)
    if env.device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    data = report.TimedIterator(itertools.cycle(batches))
    stepper = Stepper(model, opts.combined, env.device, cfg.train.precision, cfg.train.pipeline)  # the real step
    total = args.warmup + args.steps
    model.train()

    def step(i: int = 0) -> torch.Tensor:
        set_learning_rates(opts, cfg.optimizer, lr_factor(cfg.optimizer, i, total))
        return stepper(data)

    if env.world_size > 1:
        torch.distributed.barrier()
    clock = report.StepClock(env.device, args.warmup)
    peer_wait = report.PeerWait()
    wait_at_warmup = 0.0
    for i in range(total):
        step(i)
        clock.tick()
        if i + 1 == args.warmup:
            wait_at_warmup = data.wait_seconds
            peer_wait.mark_start()
    peer_wait.mark_end()
    numbers = report.rank_numbers(clock, cfg.train.batch_size, data.wait_seconds - wait_at_warmup, env.device,
                                  rss_before_model_mb=rss_before_model,
                                  peer_wait_ms_per_step=peer_wait.ms_per_step(clock.measured_steps), **memory)
    if args.profile:
        table = profile_steps(step, args.profile_steps, args.profile, env.rank)
        if env.is_main:
            print(table)
    stepper.detach()
    return report.gather_ranks(numbers), plan_report, threads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench step", description=__doc__.split("\n\n")[0])
    add_common_args(parser, warmup=20, steps=100)
    parser.add_argument("--profile", metavar="DIR", help="also profile --profile-steps steps after the "
                        "measurement (torch.profiler); traces and op tables go to DIR")
    parser.add_argument("--profile-steps", type=int, default=20)
    args, cfg = parse(parser, list(argv or []))
    quiet_library_noise()
    env = init_distributed(cfg.train.device)
    try:
        per_rank, plan_report, threads = measure(args, cfg, env)
        gc.collect()  # the model's last references: gloo joins its threads before destroy()
        if env.is_main:
            summary = distributed_summary(per_rank, cfg, threads)
            summary["table_shards_mb_per_rank"] = [round(r["table_shards_mb"] + r["table_optimizer_state_mb"], 1)
                                                   for r in per_rank]
            summary["rss_bound_mb_per_rank"] = [round(r["rss_bound_mb"], 1) for r in per_rank]
            summary["rss_within_bound"] = all(r["peak_rss_mb"] <= r["rss_bound_mb"] for r in per_rank)
            mem_lines = "\n".join(
                f"rank {i}: table shards {r['table_shards_mb']:,.0f} MiB + table optimizer state "
                f"{r['table_optimizer_state_mb']:,.0f} MiB + dense {r['dense_params_and_state_mb']:,.0f} MiB; "
                f"RSS before the model {r['rss_before_model_mb']:,.0f} MiB; peak RSS {r['peak_rss_mb']:,.0f} MiB "
                f"(bound 1.25 x shards+state + 1.5 GiB = {r['rss_bound_mb']:,.0f} MiB)"
                for i, r in enumerate(per_rank)
            )
            setup = [
                ("model", config_line(cfg)),
                ("run", run_line(env, cfg, threads, args.warmup, args.steps) + f" on {DISTINCT_BATCHES} pre-built batches"),
                ("sharding", sharding_line(cfg, plan_report)),
            ]
            table = report.rank_table(per_rank, summary) + "\n\n" + format_report(plan_report) + "\n\n" + mem_lines
            report.emit("step", env.world_size, summary=summary, per_rank=per_rank, setup=setup,
                        config=cfg.to_dict(), out=args.out, table=table)
    finally:
        destroy()
    return 0
