"""End to end: the real ``Trainer`` reading Parquet (loader, pipeline, logging, everything),
timed step by step.

    torchrun --nproc_per_node=2 -m deepfm_dist.bench e2e [--warmup 20] [--steps 200]
        [--tables config|kaggle] [--section.key=value ...]

The run is ``deepfm_dist.trainer.Trainer`` as ``deepfm-train`` runs it, with
``train.max_steps = warmup + steps`` (capped to one epoch, so no mid-run evaluation falls in
the measured window), no checkpoint, no TensorBoard. The only addition is a clock after each
``train_step`` and the loader's own count of time spent waiting for batches. The final
evaluation runs as usual but is not timed. Data: ``data.train``/``data.val`` as configured
(default: the synthetic set ``launcher/train.sh`` and ``launcher/bench.sh`` generate).
"""

from __future__ import annotations

import argparse
import gc

from deepfm_dist.bench import report
from deepfm_dist.bench.common import add_common_args, config_line, distributed_summary, parse, run_line, sharding_line
from deepfm_dist.data import resolve_parquet_paths
from deepfm_dist.distributed.env import destroy, init_distributed
from deepfm_dist.trainer import Trainer, quiet_library_noise


class TimedTrainer(Trainer):
    """The real Trainer plus a clock read after every training step."""

    def __init__(self, *args, warmup: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.clock = report.StepClock(self.env.device, warmup)
        self.wait_at_warmup = 0.0
        self.peer_wait = report.PeerWait()

    def train_step(self, pipeline, batches):
        loss = super().train_step(pipeline, batches)  # StopIteration at the end passes through
        self.clock.tick()
        self.peer_wait.mark_end()  # after every step: what follows the last one (eval) is not counted
        if len(self.clock.ends) == self.clock.warmup:
            self.wait_at_warmup = self.train_reader.wait_seconds
            self.peer_wait.mark_start()
        return loss


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
        cfg.train.max_steps = args.warmup + args.steps
        trainer = TimedTrainer(cfg, env, train_files, val_files, warmup=args.warmup)
        if trainer.total_steps < cfg.train.max_steps:
            raise SystemExit(
                f"bench e2e: {args.warmup} + {args.steps} steps need {cfg.train.max_steps * trainer.global_batch:,} "
                f"rows but one epoch of data.train gives {trainer.steps_per_epoch} steps; use fewer --steps or more data"
            )
        trainer.total_steps = min(trainer.total_steps, trainer.steps_per_epoch)
        trainer.run()
        numbers = report.rank_numbers(trainer.clock, cfg.train.batch_size,
                                      trainer.train_reader.wait_seconds - trainer.wait_at_warmup, env.device,
                                      peer_wait_ms_per_step=trainer.peer_wait.ms_per_step(trainer.clock.measured_steps))
        per_rank = report.gather_ranks(numbers)
        threads, placements, num_rows = trainer.threads, trainer.placements, trainer.train_reader.num_rows
        # The sharded model holds the process group: drop it before destroy() (see trainer.train).
        del trainer
        gc.collect()
        if env.is_main:
            summary = distributed_summary(per_rank, cfg, threads)
            setup = [
                ("model", config_line(cfg)),
                ("run", run_line(env, cfg, threads, args.warmup, args.steps)),
                ("data", f"{len(train_files)} Parquet files, {num_rows:,} rows "
                         f"({', '.join(cfg.data.train)}); workers {cfg.data.num_workers}, prefetch "
                         f"{cfg.data.prefetch}, shuffle {cfg.data.shuffle}"),
                ("sharding", sharding_line(cfg, placements)),
            ]
            report.emit("e2e", env.world_size, summary=summary, per_rank=per_rank, setup=setup,
                        config=cfg.to_dict(), out=args.out)
    finally:
        destroy()
    return 0
