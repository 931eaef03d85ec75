"""End to end: the real ``Trainer`` reading Parquet (loader, pipeline, logging, everything),
timed step by step.

    torchrun --nproc_per_node=2 -m benchmarks e2e [--warmup 20] [--steps 200]
        [--tables config|kaggle] [--section.key=value ...]

The run is ``deepfm_dist.trainer.Trainer`` as ``deepfm-train`` runs it, with
``train.max_steps = warmup + steps`` in one epoch (so no end-of-epoch evaluation falls in the
measured window), no checkpoint, no TensorBoard. The only addition is a step hook that reads a
clock after each step, and the loader's own count of time spent waiting for batches. The final
evaluation runs as usual but is not timed. Data: ``data.train``/``data.val`` as configured
(default: the synthetic set ``launcher/train.sh`` and ``launcher/bench.sh`` generate).
"""

from __future__ import annotations

import argparse
import gc

from benchmarks import report
from benchmarks.common import add_common_args, config_line, distributed_summary, parse, run_line, sharding_line
from deepfm_dist.data import resolve_parquet_paths
from deepfm_dist.distributed.env import destroy, init_distributed
from deepfm_dist.logs import quiet_library_noise
from deepfm_dist.trainer import Trainer


class StepTimer:
    """A step hook: a clock read after every training step, and the loader's wait and the
    peers' wait from the end of the warm-up."""

    def __init__(self, device, warmup: int):
        self.clock = report.StepClock(device, warmup)
        self.wait_at_warmup = 0.0
        self.peer_wait = report.PeerWait()

    def __call__(self, trainer: Trainer) -> None:
        self.clock.tick()
        self.peer_wait.mark_end()  # after every step: what follows the last one (eval) is not counted
        if len(self.clock.ends) == self.clock.warmup:
            self.wait_at_warmup = trainer.train_reader.wait_seconds
            self.peer_wait.mark_start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench e2e", description=__doc__.split("\n\n")[0])
    add_common_args(parser, warmup=20, steps=200)
    args, cfg = parse(parser, list(argv or []) + ["--checkpoint.at_end=false"])
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first steps fill the pipeline)")
    quiet_library_noise()
    train_files = resolve_parquet_paths(cfg.data.train, "data.train")
    val_files = resolve_parquet_paths(cfg.data.val, "data.val")
    env = init_distributed(cfg.train.device)
    try:
        if not cfg.run_dir or cfg.run_dir == "runs/default":
            cfg.run_dir = f"runs/bench/e2e_ws{env.world_size}"
        cfg.train.max_steps, cfg.train.epochs = args.warmup + args.steps, 1
        timer = StepTimer(env.device, args.warmup)
        trainer = Trainer(cfg, env, train_files, val_files, step_hooks=(timer,))
        if trainer.total_steps < cfg.train.max_steps:
            raise SystemExit(
                f"bench e2e: {args.warmup} + {args.steps} steps need {cfg.train.max_steps * trainer.global_batch:,} "
                f"rows but one epoch of data.train gives {trainer.steps_per_epoch} steps; use fewer --steps or more data"
            )
        trainer.run()
        numbers = report.rank_numbers(timer.clock, cfg.train.batch_size,
                                      trainer.train_reader.wait_seconds - timer.wait_at_warmup, env.device,
                                      peer_wait_ms_per_step=timer.peer_wait.ms_per_step(timer.clock.measured_steps))
        per_rank = report.gather_ranks(numbers)
        threads, plan_report, num_rows = trainer.threads, trainer.plan_report, trainer.train_reader.num_rows
        workers = trainer.train_reader.num_workers
        # The sharded model holds the process group: drop it before destroy() (see trainer.train).
        del trainer
        gc.collect()
        if env.is_main:
            summary = distributed_summary(per_rank, cfg, threads)
            setup = [
                ("model", config_line(cfg)),
                ("run", run_line(env, cfg, threads, args.warmup, args.steps)),
                ("data", f"{len(train_files)} Parquet files, {num_rows:,} rows "
                         f"({', '.join(cfg.data.train)}); workers {workers}, prefetch "
                         f"{cfg.data.prefetch}, shuffle {cfg.data.shuffle}"),
                ("sharding", sharding_line(cfg, plan_report)),
            ]
            report.emit("e2e", env.world_size, summary=summary, per_rank=per_rank, setup=setup,
                        config=cfg.to_dict(), out=args.out)
    finally:
        destroy()
    return 0
