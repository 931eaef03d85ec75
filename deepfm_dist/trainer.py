"""The training run: set up the parts, then the loop. Rank 0 talks; every rank computes.

The loop (``Trainer.train``) only asks components when to act, each owning its schedule:
``MetricsLogger`` (logs.py: console, metrics.jsonl, TensorBoard), ``Evaluator``
(evaluator.py), ``Checkpointer`` (checkpoint.py: saving and resuming), ``HealthCheck``
(health.py: stop signals, non-finite loss, skipped data); a step is ``Stepper`` (step.py).
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import time
from typing import Callable

from deepfm_dist import checkpoint as ckpt
from deepfm_dist.config import Config
from deepfm_dist.data import ParquetLoader, resolve_parquet_paths
from deepfm_dist.data import vocab as data_vocab
from deepfm_dist.data.loader import auto_num_workers
from deepfm_dist.distributed.env import DistEnv, destroy, init_distributed, setup_cpu_rank
from deepfm_dist.distributed.planning import format_report
from deepfm_dist.distributed.sharding import shard_model
from deepfm_dist.evaluator import Evaluator
from deepfm_dist.fsutil import write_json_atomic
from deepfm_dist.health import HealthCheck
from deepfm_dist.logs import MetricsLogger, RankLogger, quiet_library_noise
from deepfm_dist.optim import batch_scale, build_optimizers, check_embedding_optimizer, lr_factor, set_learning_rates
from deepfm_dist.step import Stepper, build_model, check_precision, resolve_precision
from deepfm_dist.versions import check_torchrec


def make_reader(cfg: Config, env: DistEnv, files: list[str], *, train: bool) -> ParquetLoader:
    batch = cfg.train.batch_size if train else (cfg.train.val_batch_size or cfg.train.batch_size)
    return ParquetLoader(files, cfg.data, batch_size=batch, rank=env.rank, world_size=env.world_size, train=train,
                         seed=cfg.train.seed, pin_memory=env.device.type == "cuda",
                         num_workers=auto_num_workers(cfg.data.num_workers, env.device.type, env.local_world_size))


def find_oracle(val_specs: list[str]) -> dict | None:
    """The synthetic generator's oracle.json beside the validation folder, if there is one."""
    for spec in val_specs:
        path = os.path.join(os.path.dirname(os.path.abspath(spec.rstrip("/"))), "oracle.json")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    return None


def train(cfg: Config) -> dict:
    """Run training as configured; every rank returns the same summary dict."""
    quiet_library_noise()
    check_torchrec()
    # data.vocab: the table sizes and the content hash the checkpoints will carry
    cfg.data = data_vocab.resolve(cfg.data)
    # Resolve paths and read the Parquet footers before joining the process group: every
    # rank checks the same files, so bad input fails all ranks alike, before any collective.
    train_files = resolve_parquet_paths(cfg.data.train, "data.train")
    val_files = resolve_parquet_paths(cfg.data.val, "data.val")
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts and not cfg.resume:
        # torchrun --max-restarts restarted the workers after a failure: continue from the
        # latest checkpoint instead of starting over.
        cfg.resume = True
    env = init_distributed(cfg.train.device)
    if restarts and env.is_main:
        print(f"elastic restart #{restarts}: resuming from the latest checkpoint", flush=True)
    try:
        trainer = Trainer(cfg, env, train_files, val_files)
        summary = trainer.run()
        # gloo joins its worker threads only when the last reference to the process group
        # goes; the sharded model holds one. Drop it before destroy(), or a worker thread can
        # still be tearing down during interpreter exit ("terminate called without an active
        # exception", exit -6, after a complete run).
        del trainer
        gc.collect()
        return summary
    finally:
        destroy()


class Trainer:
    """Owns the sharded model, optimizers, loaders and the components; ``run`` trains.

    ``step_hooks``: callables ``hook(trainer)`` run after every training step (the end-to-end
    benchmark reads its clock there)."""

    def __init__(self, cfg: Config, env: DistEnv, train_files: list[str], val_files: list[str],
                 step_hooks: tuple[Callable[[Trainer], None], ...] = ()):
        self.cfg, self.env, self.step_hooks = cfg, env, step_hooks
        self.log = RankLogger(env)
        check_embedding_optimizer(cfg.optimizer, env.device.type)
        if cfg.train.precision == "auto":
            cfg.train.precision = resolve_precision("auto", env.device.type)
            self.log(f"train.precision=auto: {cfg.train.precision} on this {env.device.type}")
        check_precision(cfg.train.precision, env.device.type)
        if cfg.train.global_batch_size:
            if cfg.train.global_batch_size % env.world_size:
                raise ValueError(f"train.global_batch_size={cfg.train.global_batch_size}: expected a multiple of the "
                                 f"world size ({env.world_size}), so that every rank takes the same rows")
            cfg.train.batch_size = cfg.train.global_batch_size // env.world_size  # recorded as run
        self.threads, self.cores = setup_cpu_rank(env, cfg.train.threads, cfg.train.pin_cpus)
        self.train_reader = make_reader(cfg, env, train_files, train=True)
        self.val_reader = make_reader(cfg, env, val_files, train=False)
        if len(self.train_reader) == 0:
            raise ValueError(
                f"data.train has {self.train_reader.num_rows} rows: fewer than world_size ({env.world_size}) x "
                f"train.batch_size ({cfg.train.batch_size}); not one full batch per rank"
            )
        self.log(f"deepfm-dist: world_size={env.world_size} backend={env.backend} device={env.device.type}"
                 + (f" threads/rank={self.threads}" if self.threads else "") + (" pinned to own cores" if self.cores else ""))
        self.log(f"data: train {self.train_reader.num_rows:,} rows in {len(train_files)} files "
                 f"({len(self.train_reader)} steps/epoch of {cfg.train.batch_size} x {env.world_size}), "
                 f"val {self.val_reader.num_rows:,} rows in {len(val_files)} files; "
                 f"loader workers/rank={self.train_reader.num_workers}")
        self.model, _, plan_report = shard_model(build_model(cfg), cfg, env)
        self.opts = build_optimizers(self.model, cfg.optimizer, cfg.train.grad_clip)
        self.plan_report = plan_report  # rank 0's (None elsewhere): plan.json, each checkpoint's meta.json
        self.plan_path = os.path.join(cfg.run_dir, "plan.json")
        if env.is_main:
            os.makedirs(cfg.run_dir, exist_ok=True)
            write_json_atomic(self.plan_path, plan_report.to_json(), indent=1)  # as deepfm-plan --json writes it
            self.log(f"sharding plan ({plan_report.world_size} x {plan_report.device}):\n" + format_report(plan_report))
        self.global_batch = cfg.train.batch_size * env.world_size
        self.lr_scale = batch_scale(cfg.optimizer, self.global_batch)
        if cfg.optimizer.batch_scaling != "none":
            self.log(f"learning rates at global batch {self.global_batch}: embedding "
                     f"{cfg.optimizer.embedding_lr * self.lr_scale:.4g}, dense {cfg.optimizer.dense_lr * self.lr_scale:.4g} "
                     f"(optimizer.batch_scaling={cfg.optimizer.batch_scaling}: x{self.lr_scale:.3g} of the rates "
                     f"given at optimizer.reference_batch={cfg.optimizer.reference_batch})")
        self.steps_per_epoch = len(self.train_reader)
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        # The components, each with its own schedule.
        self.metrics = MetricsLogger(env, cfg.run_dir, log_every=cfg.train.log_every, total_steps=self.total_steps,
                                     tensorboard=cfg.train.tensorboard, progress=cfg.train.progress)
        self.evaluator = Evaluator(self.model, self.val_reader, env, self.metrics, every=cfg.train.eval_every,
                                   precision=cfg.train.precision, samples_per_step=self.global_batch)
        self.checkpointer = ckpt.Checkpointer(cfg, env, self.model, self.opts, plan_report, self.log)
        self.health = HealthCheck(env, self.metrics, (self.train_reader, self.val_reader), cfg.checkpoint_dir)
        self.state = ckpt.TrainState(step=0, epoch=0, step_in_epoch=0, loader_states=[])
        self.train_seconds, self.trained_samples, self.last_loss = 0.0, 0, float("nan")
        self.early_stopped = False  # train.early_stop_patience ran out

    def run(self) -> dict:
        with self.health.stop:
            try:
                summary = self.train()
                self.health.close()
                return summary
            finally:
                self.metrics.close()

    def train(self) -> dict:
        """The loop: resume, then epochs of steps; the components say when to log, evaluate and save."""
        self.state, loader_state = self.checkpointer.resume(self.steps_per_epoch)
        state, stopped, tracked = self.state, False, None
        self.metrics.start(state.step)
        self.model.train()
        while state.epoch < self.cfg.train.epochs and state.step < self.total_steps:
            # -- an epoch: the loader from its position, the step function over its batches
            tracked, batches = self.epoch_batches(loader_state)
            loader_state, stepper = None, Stepper(self.model, self.opts.combined, self.env.device,
                                                  self.cfg.train.precision, self.cfg.train.pipeline)
            self.metrics.reset_window()
            while True:
                # -- one step
                try:
                    self.one_step(stepper, batches)
                except StopIteration:
                    break
                step = state.step
                if self.health.stop_agreed():
                    stopped = True
                    self.log(f"stop signal received: checkpointing at step {step} and exiting")
                    break
                log, evaluate, save = self.metrics.due(step), self.evaluator.due(step), self.checkpointer.due(step)
                if not (log or evaluate or save):
                    continue
                # -- agree over ranks on the loss and a timed save. note: a host sync point
                agreed = self.health.sync(self.checkpointer.timed_due())
                self.last_loss = agreed.loss
                if log:
                    lr = self.opts.dense.param_groups[0]["lr"]
                    self.metrics.train(step=step, epoch=state.epoch + 1, samples_per_step=self.global_batch,
                                       loss=self.last_loss, lr=lr, lr_factor=lr / self.cfg.optimizer.dense_lr)
                # -- evaluate and checkpoint on their schedules (the last step's come after the loop)
                if evaluate and step < self.total_steps:
                    stepper.detach()  # plain forward for evaluation; the next step re-attaches
                    self.early_stopped = self.evaluate(lambda: tracked.position(state.step_in_epoch))
                    self.metrics.reset_window()
                    if self.early_stopped:
                        break
                if (save or agreed.save) and step < self.total_steps:
                    self.checkpointer.save(state, tracked.position(state.step_in_epoch))
                    self.metrics.reset_window()
            stepper.detach()
            if stopped or self.early_stopped:
                break
            if state.step_in_epoch >= self.steps_per_epoch:  # -- the epoch's end: evaluate
                self.early_stopped = self.evaluate(lambda: tracked.position(state.step_in_epoch))
                state.epoch, state.step_in_epoch, tracked = state.epoch + 1, 0, None
                if self.early_stopped:
                    break
        return self.end(stopped, tracked)

    def evaluate(self, position) -> bool:
        """Evaluate now; the checkpointer keeps the best model. True: stop early (patience spent)."""
        record = self.evaluator.run(self.state.step, self.state.epoch + 1)
        stop = self.checkpointer.track_best(record, self.state, position)
        if stop:
            best = self.checkpointer.best
            self.log(f"early stop: {best['evals_since']} evaluations without a better val {best['metric']} "
                     f"than {best['value']:.4f} at step {best['step']}")
        return stop

    def epoch_batches(self, loader_state) -> tuple[ckpt.TrackedIterator, itertools.islice]:
        """This epoch's batches from the step it continues at, and the tracker of positions."""
        self.train_reader.set_epoch(self.state.epoch)
        if loader_state is not None:
            if self.cfg.data.num_workers < 0:  # auto: the order the checkpoint's count gave
                self.train_reader.keep_saved_workers(loader_state)
            self.train_reader.load_state_dict(loader_state)
        tracked = ckpt.TrackedIterator(self.train_reader, self.state.step_in_epoch)
        remaining = min(self.steps_per_epoch - self.state.step_in_epoch, self.total_steps - self.state.step)
        return tracked, itertools.islice(tracked, remaining)  # never pull a batch we will not train

    def one_step(self, stepper: Stepper, batches) -> None:
        """The learning rate of this step, the step, and its bookkeeping (no host sync)."""
        factor = lr_factor(self.cfg.optimizer, self.state.step, self.total_steps) * self.lr_scale
        set_learning_rates(self.opts, self.cfg.optimizer, factor)
        t0 = time.perf_counter()
        loss = stepper(batches)  # StopIteration at the end of the batches passes through
        self.train_seconds += time.perf_counter() - t0
        self.trained_samples += self.global_batch
        self.state.step += 1
        self.state.step_in_epoch += 1
        self.health.record(self.state.step, loss)
        self.metrics.step_done()
        for hook in self.step_hooks:
            hook(self)

    def end(self, stopped: bool, tracked: ckpt.TrackedIterator | None) -> dict:
        """After the loop: on a stop, checkpoint at once (the grace period is short) and skip
        the evaluation; otherwise evaluate the final model (unless just done) and checkpoint."""
        state = self.state
        position = (lambda: tracked.position(state.step_in_epoch) if tracked is not None
                    else self.train_reader.state_dict())
        self.metrics.end_progress()
        if stopped:
            if self.health.pending:  # the loss since the last sync point: finite on every rank?
                self.last_loss = self.health.sync(False).loss
            self.checkpointer.save(state, position())
            return self.finish(stopped=True)
        if self.evaluator.last_step() != state.step:
            self.evaluate(position)
        if self.cfg.checkpoint.at_end and state.step > 0 and self.checkpointer.last_saved_step != state.step:
            self.checkpointer.save(state, position())
        return self.finish()

    def finish(self, stopped: bool = False) -> dict:
        """The run's summary: the same dict on every rank; rank 0 writes summary.json and prints it."""
        cfg, env = self.cfg, self.env
        skipped = self.health.report_skipped(self.state.step)  # collective: before rank 0 alone writes
        nan = float("nan")
        final = self.evaluator.results[-1] if self.evaluator.results else {
            "val_auc": nan, "val_logloss": nan, "val_ne": nan, "val_calibration": nan, "val_rows": 0}
        rate = self.trained_samples / self.train_seconds if self.train_seconds > 0 else 0.0
        summary = {
            "world_size": env.world_size,
            "backend": env.backend,
            "device": env.device.type,
            "steps": self.state.step,
            "stopped_by_signal": stopped,
            "epochs": cfg.train.epochs,
            "batch_size_per_rank": cfg.train.batch_size,
            "train_samples": self.state.step * self.global_batch,
            "train_samples_this_run": self.trained_samples,
            "train_seconds": self.train_seconds,
            "train_samples_per_s": rate,
            "train_samples_per_s_per_rank": rate / env.world_size,
            "last_loss": self.last_loss,
            "val_auc": final["val_auc"],
            "val_logloss": final["val_logloss"],
            "val_ne": final["val_ne"],
            "val_calibration": final["val_calibration"],
            "val_rows": final["val_rows"],
            "evals": self.evaluator.results,
            "plan_file": self.plan_path,
            "skipped": skipped,  # data.skip_bad_row_groups: totals over all ranks, and the entries
            "checkpoint": ckpt.latest(cfg.checkpoint_dir),
            "early_stopped": self.early_stopped,
            # checkpoint.best_metric: the best evaluation's checkpoint (deepfm-predict / -export's default)
            "best": self.checkpointer.best,
            "config": cfg.to_dict(),
        }
        oracle = find_oracle(cfg.data.val)
        if oracle is not None:
            summary["oracle_val_auc"] = oracle.get("val_auc")
            summary["oracle_val_logloss"] = oracle.get("val_logloss")
        if env.is_main:
            write_json_atomic(os.path.join(cfg.run_dir, "summary.json"), summary)
            rows = [
                ("world size", f"{env.world_size} ({env.backend}, {env.device.type})"),
                ("steps", f"{self.state.step}"),
                ("train samples", f"{summary['train_samples']:,}"),
                ("samples/s", f"{rate:,.0f} ({rate / env.world_size:,.0f} per rank)"),
                ("last loss", f"{self.last_loss:.4f}"),
                ("val AUC", f"{final['val_auc']:.4f}"),
                ("val logloss", f"{final['val_logloss']:.4f}"),
                ("val NE", f"{final['val_ne']:.4f}"),
                ("val calibration", f"{final['val_calibration']:.3f}"),
            ]
            if oracle is not None:
                rows.append(("oracle val AUC", f"{oracle.get('val_auc', nan):.4f}"))
                rows.append(("oracle val logloss", f"{oracle.get('val_logloss', nan):.4f}"))
            best = self.checkpointer.best
            if best and best.get("checkpoint"):
                rows.append(("best checkpoint", f"{os.path.join(cfg.checkpoint_dir, best['checkpoint'])} "
                                                f"(val {best['metric']} {best['value']:.4f}, step {best['step']})"))
            if self.early_stopped:
                rows.append(("early stopped", f"after {best['evals_since']} evaluations without improving"))
            rows.append(("summary", os.path.join(cfg.run_dir, "summary.json")))
            self.log("\n".join(f"{k:<20} {v}" for k, v in rows))
        return summary
