"""The training loop: build, shard, train, evaluate, report. Rank 0 talks; every rank computes."""

from __future__ import annotations

import gc
import itertools
import json
import logging
import os
import signal
import sys
import time
import warnings

import torch
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from deepfm_dist import checkpoint as ckpt

from deepfm_dist.config import Config
from deepfm_dist.data import ParquetLoader, resolve_parquet_paths
from deepfm_dist.distributed.env import DistEnv, destroy, init_distributed, setup_cpu_rank
from deepfm_dist.distributed.sharding import describe_plan, plan_report, save_plan, shard_model
from deepfm_dist.loss import DeepFMTrain
from deepfm_dist.metrics import global_auc_logloss
from deepfm_dist.model import table_name
from deepfm_dist.model.build import build_deepfm, table_names
from deepfm_dist.optim import build_optimizers, check_embedding_optimizer, lr_factor, set_learning_rates


def quiet_library_noise() -> None:
    """Silence messages that say nothing to our users (see shared/TORCHREC_CPU.md)."""
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    logging.getLogger("torchrec").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchrec")
    # Deprecation notices torchrec triggers inside torch.distributed (not actionable for users).
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


class RankLogger:
    """Rank 0 prints; other ranks stay silent."""

    def __init__(self, env: DistEnv):
        self.enabled = env.is_main

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)


def build_model(cfg: Config) -> DeepFMTrain:
    """DeepFM with its tables on ``meta`` (DMP materialises the shards), wrapped with the loss."""
    torch.manual_seed(cfg.train.seed)
    return DeepFMTrain(build_deepfm(cfg, table_device="meta"))


def make_reader(cfg: Config, env: DistEnv, files: list[str], *, train: bool) -> ParquetLoader:
    batch = cfg.train.batch_size if train else (cfg.train.val_batch_size or cfg.train.batch_size)
    return ParquetLoader(
        files,
        cfg.data,
        batch_size=batch,
        rank=env.rank,
        world_size=env.world_size,
        train=train,
        seed=cfg.train.seed,
        pin_memory=env.device.type == "cuda",
    )


@torch.no_grad()
def evaluate(model: nn.Module, reader, env: DistEnv, precision: str = "fp32") -> tuple[float, float, int]:
    """Score this rank's share of the validation set; exact AUC/logloss over all ranks' rows."""
    sync_dense_buffers(model, env)
    model.eval()
    logits, labels, weights = [], [], []
    for batch in reader:
        batch = batch.to(env.device, non_blocking=True)
        with autocast(env.device, precision):
            _, (_, lg, lb, w) = model(batch)
        logits.append(lg.float())
        labels.append(lb)
        weights.append(w)
    model.train()
    keep = torch.cat(weights) > 0  # padding rows (weight 0) are not scored
    return global_auc_logloss(torch.cat(logits)[keep], torch.cat(labels)[keep].float())


@torch.no_grad()
def sync_dense_buffers(model: nn.Module, env: DistEnv) -> None:
    """Give every rank rank 0's BatchNorm running statistics.

    TorchRec wraps the dense part in DDP with ``broadcast_buffers=False``, so every rank
    updates its running statistics with its own batches only and the ranks disagree. DCP saves
    one copy of a replicated tensor from whichever rank it picks: broadcasting rank 0's before
    every checkpoint and evaluation makes the checkpoint, the resume and the scores agree.
    """
    if env.world_size == 1:
        return
    for name, buf in model.named_buffers():
        if "sparse_fields" not in name and isinstance(buf, torch.Tensor) and buf.is_floating_point():
            torch.distributed.broadcast(buf, src=0)


def autocast(device: torch.device, precision: str):
    """bf16 autocast of the dense compute (CUDA, or CPU: the MLP's oneDNN Linear layers follow
    it, see model/linear.py); a no-op context for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def check_precision(precision: str, device_type: str) -> None:
    """Fail at start-up when bf16 would be emulated: on a CPU without native bf16 (AVX512-BF16
    or AMX) oneDNN's bf16 matmuls are slower than fp32, so asking for them is a mistake."""
    if precision == "bf16" and device_type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise ValueError(
            "train.precision='bf16' needs a CPU with native bf16 (AVX512-BF16 or AMX) for oneDNN; "
            "this CPU has neither, so bf16 would be slower than fp32: use train.precision=fp32"
        )


def find_oracle(val_specs: list[str]) -> dict | None:
    """The synthetic generator's oracle.json beside the validation folder, if there is one."""
    for spec in val_specs:
        path = os.path.join(os.path.dirname(os.path.abspath(spec.rstrip("/"))), "oracle.json")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    return None


def write_json_atomic(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


class MetricsLog:
    """Rank 0 records every log step and evaluation in ``<run_dir>/metrics.jsonl`` (one JSON
    object per line, appended across resumes) and as TensorBoard scalars in ``<run_dir>/tb``."""

    def __init__(self, env: DistEnv, run_dir: str, tensorboard: bool):
        self.path = os.path.join(run_dir, "metrics.jsonl") if env.is_main else None
        self.tb = None
        if env.is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=os.path.join(run_dir, "tb"))

    def write(self, **record) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = "val" if "val_auc" in record else "train"
            for key in ("loss", "lr", "samples_per_s", "val_auc", "val_logloss"):
                if key in record:
                    self.tb.add_scalar(f"{prefix}/{key.removeprefix('val_')}", record[key], record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class StopSignal:
    """SIGTERM/SIGUSR1 (Slurm's warning before a time limit or preemption) ask for a stop.

    The handler only sets a flag; the ranks agree on it at the next sync point (a log step), save
    a checkpoint there and return, so a requeued job resumes from that step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class TrackedIterator:
    """Iterates a loader and remembers its position after each batch it handed out.

    The pipeline pulls batches ahead of the step it trains, so the loader's current position
    is not the checkpoint's: ``position(k)`` is the loader state after exactly k batches of
    this epoch (k = steps trained), which a resumed run continues from.
    """

    def __init__(self, loader, start: int):
        self._it = iter(loader)
        self._loader = loader
        self._states = {start: loader.state_dict()}
        self._count = start

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._it)
        self._count += 1
        self._states[self._count] = self._loader.state_dict()
        for k in [k for k in self._states if k < self._count - 8]:
            del self._states[k]
        return batch

    def position(self, trained: int):
        return self._states[trained]


def train(cfg: Config) -> dict:
    """Run training as configured; every rank returns the same summary dict."""
    quiet_library_noise()
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
        # still be tearing down during interpreter exit (seen: "terminate called without an
        # active exception", exit -6, after a complete run).
        del trainer
        gc.collect()
        return summary
    finally:
        destroy()


class Trainer:
    """Owns the sharded model, optimizers, loaders and the loop. Rank 0 talks."""

    def __init__(self, cfg: Config, env: DistEnv, train_files: list[str], val_files: list[str]):
        self.cfg, self.env = cfg, env
        self.log = RankLogger(env)
        check_embedding_optimizer(cfg.optimizer, env.device.type)
        check_precision(cfg.train.precision, env.device.type)
        self.threads, self.cores = setup_cpu_rank(env, cfg.train.threads, cfg.train.pin_cpus)
        self.train_reader = make_reader(cfg, env, train_files, train=True)
        self.val_reader = make_reader(cfg, env, val_files, train=False)
        if len(self.train_reader) == 0:
            raise ValueError(
                f"data.train has {self.train_reader.num_rows} rows: fewer than world_size ({env.world_size}) x "
                f"train.batch_size ({cfg.train.batch_size}); not one full batch per rank"
            )
        self.log(
            f"deepfm-dist: world_size={env.world_size} backend={env.backend} device={env.device.type}"
            + (f" threads/rank={self.threads}" if self.threads else "")
            + (" pinned to own cores" if self.cores else "")
        )
        self.log(
            f"data: train {self.train_reader.num_rows:,} rows in {len(train_files)} files "
            f"({len(self.train_reader)} steps/epoch of {cfg.train.batch_size} x {env.world_size}), "
            f"val {self.val_reader.num_rows:,} rows in {len(val_files)} files"
        )
        self.model, plan = shard_model(build_model(cfg), cfg, env)
        self.opts = build_optimizers(self.model, cfg.optimizer, cfg.train.grad_clip)
        self.placements = describe_plan(plan, env.world_size, [table_name(t) for t in table_names(cfg)])
        self.plan_path = os.path.join(cfg.run_dir, "plan.json")
        if env.is_main:
            os.makedirs(cfg.run_dir, exist_ok=True)
            save_plan(self.placements, self.plan_path)
            self.log(plan_report(self.placements))
        self.metrics = MetricsLog(env, cfg.run_dir, cfg.train.tensorboard)
        self.global_batch = cfg.train.batch_size * env.world_size
        self.steps_per_epoch = len(self.train_reader)
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.state = ckpt.TrainState(step=0, epoch=0, step_in_epoch=0, loader_states=[])
        self.resume_loader_state = None
        self.last_save_time = time.monotonic()
        self.skip_events_seen = 0

    # -- checkpoints ---------------------------------------------------------------------

    def maybe_resume(self) -> None:
        if not self.cfg.resume:
            return
        path = ckpt.latest(self.cfg.checkpoint_dir)
        if path is None:
            self.log(f"resume: no complete checkpoint in {self.cfg.checkpoint_dir}; starting fresh")
            return
        if self.cfg.sharding.shm_all_to_all:
            raise ValueError(
                f"cannot resume from {path} with sharding.shm_all_to_all=true: torch's sharded tensors "
                f"do not know that process group by name and fail to load a checkpoint on a rank that holds "
                f"no shard of a table. Resume with sharding.shm_all_to_all=false (the checkpoint is the same)."
            )
        # The dense optimizer's state is created lazily; make it so DCP can load into it.
        self.opts.dense.init_state()
        meta = ckpt.load(path, model=self.model, optimizer=self.opts.combined)
        step_in_epoch = meta["step_in_epoch"]
        epoch = meta["epoch"]
        if meta["world_size"] == self.env.world_size:
            self.resume_loader_state = meta["loader_states"][self.env.rank]
        elif step_in_epoch:
            # Another world size splits the rows differently: the interrupted epoch restarts
            # (its rows are seen again) rather than skipping rows nobody trained on.
            self.log(
                f"resume: checkpoint written by {meta['world_size']} ranks, now {self.env.world_size}: "
                f"epoch {epoch + 1} restarts from its first batch"
            )
            step_in_epoch = 0
        if step_in_epoch >= self.steps_per_epoch:
            epoch, step_in_epoch, self.resume_loader_state = epoch + 1, 0, None
        self.state = ckpt.TrainState(meta["step"], epoch, step_in_epoch, [])
        self.log(f"resumed from {path} (step {meta['step']}, epoch {epoch + 1}, batch {step_in_epoch})")

    def save_checkpoint(self, tracked: TrackedIterator | None) -> str:
        position = tracked.position(self.state.step_in_epoch) if tracked is not None else self.train_reader.state_dict()
        states: list = [None] * self.env.world_size
        if self.env.world_size > 1:
            torch.distributed.all_gather_object(states, position)
        else:
            states = [position]
        self.state.loader_states = states
        # DCP stores one copy of a replicated tensor, from whichever rank it picks; make the
        # BatchNorm statistics rank 0's (the ones DDP broadcasts at the next step) everywhere.
        sync_dense_buffers(self.model, self.env)
        path = ckpt.save(
            self.cfg.checkpoint_dir,
            model=self.model,
            optimizer=self.opts.combined,
            state=self.state,
            extra_meta={"plan": [p.__dict__ for p in self.placements], "config": self.cfg.to_dict()},
            keep=self.cfg.checkpoint.keep,
        )
        self.last_save_time = time.monotonic()
        self.log(f"checkpoint: {path}")
        return path

    # -- the loop -------------------------------------------------------------------------

    def sync_point(self, pending: list[tuple[int, torch.Tensor]]) -> tuple[float, bool, bool]:
        """Mean loss over ranks of the newest step, whether any rank wants a timed save, and
        whether any rank received a stop signal.

        Raises on a non-finite loss on any rank, naming the first such step, before any
        checkpoint could include it. One small all-reduce; a host sync (log steps only).
        """
        losses = torch.stack([loss for _, loss in pending]).float()
        bad = ~torch.isfinite(losses)
        first_bad = pending[int(bad.nonzero()[0])][0] if bool(bad.any()) else -1  # note: host sync
        minutes = self.cfg.checkpoint.every_minutes
        want_save = float(minutes > 0 and time.monotonic() - self.last_save_time >= minutes * 60)
        stats = torch.tensor(
            [
                float(losses[-1]) if first_bad < 0 else 0.0,
                want_save,
                float(self.stop.received is not None),
                float(first_bad >= 0),
                float(-first_bad if first_bad >= 0 else -1e18),
                float(len(self.train_reader.skipped)),
            ],
            dtype=torch.float64, device=self.env.device,
        )
        if self.env.world_size > 1:
            summed = stats.clone()
            torch.distributed.all_reduce(summed)
            worst = stats[4:5].clone()
            torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
            stats = torch.cat([summed[:4], worst, summed[5:]])
        if stats[3] > 0:
            step = int(-stats[4])
            latest = ckpt.latest(self.cfg.checkpoint_dir)
            raise FloatingPointError(
                f"non-finite training loss at step {step}: stopping. "
                + (f"The last good checkpoint is {latest}." if latest else "No checkpoint was written.")
                + " Lower optimizer.embedding_lr / optimizer.dense_lr, or set train.grad_clip."
            )
        if int(stats[5]) != self.skip_events_seen:  # every rank sees the same sum: all gather together
            self.skip_events_seen = int(stats[5])
            self.report_skipped(pending[-1][0])
        return float(stats[0]) / self.env.world_size, bool(stats[1] > 0), bool(stats[2] > 0)

    def gather_skipped(self) -> dict:
        """Bad row groups skipped so far (``data.skip_bad_row_groups``) over every rank and both
        loaders: totals of distinct files, row groups and rows, and the entries. Collective.
        Footer-time skips are found by every rank alike, read-time ones by the rank that read them."""
        mine = [*self.train_reader.skipped, *self.val_reader.skipped]
        everyone: list = [mine]
        if self.env.world_size > 1:
            everyone = [None] * self.env.world_size
            torch.distributed.all_gather_object(everyone, mine)
        unique = list({json.dumps(x, sort_keys=True): x for part in everyone for x in part}.values())
        groups = {(x["file"], x.get("row_group")): x["rows"] for x in unique}
        return {"files": len({f for f, _ in groups}), "row_groups": len(groups), "rows": sum(groups.values()),
                "entries": unique}

    def report_skipped(self, step: int) -> dict:
        """Rank 0 says what was skipped over all ranks, in the log and metrics.jsonl. Collective."""
        found = self.gather_skipped()
        if found["row_groups"]:
            self.metrics.write(step=step, skipped_files=found["files"], skipped_row_groups=found["row_groups"],
                               skipped_rows=found["rows"])
            self.log(f"data.skip_bad_row_groups: {found['row_groups']} row group(s), {found['rows']:,} rows in "
                     f"{found['files']} file(s) skipped so far over all ranks; first: {found['entries'][0]['file']}: "
                     f"row group {found['entries'][0].get('row_group')}: {found['entries'][0]['reason']}")
        return found

    def run(self) -> dict:
        with StopSignal() as self.stop:
            try:
                return self._run()
            finally:
                self.metrics.close()

    def _run(self) -> dict:
        cfg, env = self.cfg, self.env
        stopped = False
        self.maybe_resume()
        bar = None
        if env.is_main and cfg.train.progress and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.state.step, unit="step", dynamic_ncols=True)
        train_seconds, trained_samples = 0.0, 0
        evals: list[dict] = []
        last_loss = float("nan")
        self.model.train()
        tracked: TrackedIterator | None = None
        while self.state.epoch < cfg.train.epochs and self.state.step < self.total_steps:
            epoch = self.state.epoch
            self.train_reader.set_epoch(epoch)
            if self.resume_loader_state is not None:
                self.train_reader.load_state_dict(self.resume_loader_state)
                self.resume_loader_state = None
            tracked = TrackedIterator(self.train_reader, self.state.step_in_epoch)
            remaining = min(self.steps_per_epoch - self.state.step_in_epoch, self.total_steps - self.state.step)
            batches = itertools.islice(tracked, remaining)  # never pull a batch we will not train
            pipeline = (
                TrainPipelineSparseDist(self.model, self.opts.combined, env.device, execute_all_batches=True)
                if cfg.train.pipeline
                else None
            )
            pending: list[tuple[int, torch.Tensor]] = []
            window_start, window_steps = time.perf_counter(), 0
            while True:
                set_learning_rates(self.opts, cfg.optimizer, lr_factor(cfg.optimizer, self.state.step, self.total_steps))
                t0 = time.perf_counter()
                try:
                    loss = self.train_step(pipeline, batches)
                except StopIteration:
                    break
                train_seconds += time.perf_counter() - t0
                trained_samples += self.global_batch
                self.state.step += 1
                self.state.step_in_epoch += 1
                window_steps += 1
                pending.append((self.state.step, loss))
                if bar is not None:
                    bar.update(1)
                step = self.state.step
                log_now = step % cfg.train.log_every == 0 or step == self.total_steps
                save_now = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
                eval_now = cfg.train.eval_every and step % cfg.train.eval_every == 0
                if log_now or save_now or eval_now:
                    last_loss, timed_save, stopped = self.sync_point(pending)
                    pending = []
                    save_now = save_now or timed_save
                    if stopped:
                        self.log(f"stop signal received: checkpointing at step {step} and exiting")
                        break
                if log_now:
                    now = time.perf_counter()
                    rate = window_steps * self.global_batch / (now - window_start)
                    window_start, window_steps = now, 0
                    lr = self.opts.dense.param_groups[0]["lr"]
                    self.metrics.write(step=step, epoch=epoch + 1, samples=step * self.global_batch, loss=last_loss,
                                       lr=lr, samples_per_s=rate)
                    if bar is not None:
                        bar.set_postfix(loss=f"{last_loss:.4f}", samples_s=f"{rate:,.0f}")
                    else:
                        self.log(f"epoch {epoch + 1} step {step}/{self.total_steps} | loss {last_loss:.4f} | "
                                 f"lr x{lr / cfg.optimizer.dense_lr:.3g} | {rate:,.0f} samples/s")
                if eval_now and step < self.total_steps:
                    if pipeline is not None:
                        pipeline.detach()  # plain forward for evaluation; progress() re-attaches
                    evals.append(self.run_eval(step, epoch))
                    window_start, window_steps = time.perf_counter(), 0
                if save_now and step < self.total_steps:
                    self.save_checkpoint(tracked)
                    window_start, window_steps = time.perf_counter(), 0
            if pipeline is not None:
                pipeline.detach()
            if stopped:
                break
            if self.state.step_in_epoch >= self.steps_per_epoch:
                evals.append(self.run_eval(self.state.step, epoch))
                self.state.epoch += 1
                self.state.step_in_epoch = 0
                tracked = None
            elif self.state.step >= self.total_steps:
                break
        if bar is not None:
            bar.close()
        if stopped:
            # Preempted: save first (the grace period is short), skip the evaluation.
            self.save_checkpoint(tracked)
            return self.finish(evals, last_loss, trained_samples, train_seconds, stopped=True)
        if not evals or evals[-1]["step"] != self.state.step:
            evals.append(self.run_eval(self.state.step, self.state.epoch))
        if cfg.checkpoint.at_end and self.state.step > 0:
            self.save_checkpoint(tracked)
        return self.finish(evals, last_loss, trained_samples, train_seconds)

    def train_step(self, pipeline: TrainPipelineSparseDist | None, batches) -> torch.Tensor:
        """One step; returns the detached local loss (a device tensor: no host sync here)."""
        with autocast(self.env.device, self.cfg.train.precision):
            if pipeline is not None:
                loss, *_ = pipeline.progress(batches)
                return loss
            batch = next(batches).to(self.env.device, non_blocking=True)
            self.opts.combined.zero_grad()
            loss, _ = self.model(batch)
            loss.backward()
            self.opts.combined.step()
            return loss.detach()

    def run_eval(self, step: int, epoch: int) -> dict:
        auc, ll, n = evaluate(self.model, self.val_reader, self.env, self.cfg.train.precision)
        record = {"step": step, "epoch": epoch + 1, "samples": step * self.global_batch,
                  "val_auc": auc, "val_logloss": ll, "val_rows": n}
        self.metrics.write(**record)
        self.log(f"eval step {step} (epoch {epoch + 1}): val AUC {auc:.4f} logloss {ll:.4f} ({n:,} rows)")
        return record

    def finish(self, evals: list[dict], last_loss: float, samples: int, seconds: float, stopped: bool = False) -> dict:
        cfg, env = self.cfg, self.env
        skipped = self.report_skipped(self.state.step)  # collective: before rank 0 alone writes
        nan = float("nan")
        final = evals[-1] if evals else {"val_auc": nan, "val_logloss": nan, "val_rows": 0}
        rate = samples / seconds if seconds > 0 else 0.0
        summary = {
            "world_size": env.world_size,
            "backend": env.backend,
            "device": env.device.type,
            "steps": self.state.step,
            "stopped_by_signal": stopped,
            "epochs": cfg.train.epochs,
            "batch_size_per_rank": cfg.train.batch_size,
            "train_samples": self.state.step * self.global_batch,
            "train_samples_this_run": samples,
            "train_seconds": seconds,
            "train_samples_per_s": rate,
            "train_samples_per_s_per_rank": rate / env.world_size,
            "last_loss": last_loss,
            "val_auc": final["val_auc"],
            "val_logloss": final["val_logloss"],
            "val_rows": final["val_rows"],
            "evals": evals,
            "plan_file": self.plan_path,
            "skipped": skipped,  # data.skip_bad_row_groups: totals over all ranks, and the entries
            "checkpoint": ckpt.latest(cfg.checkpoint_dir),
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
                ("last loss", f"{last_loss:.4f}"),
                ("val AUC", f"{final['val_auc']:.4f}"),
                ("val logloss", f"{final['val_logloss']:.4f}"),
            ]
            if oracle is not None:
                rows.append(("oracle val AUC", f"{oracle.get('val_auc', float('nan')):.4f}"))
                rows.append(("oracle val logloss", f"{oracle.get('val_logloss', float('nan')):.4f}"))
            rows.append(("summary", os.path.join(cfg.run_dir, "summary.json")))
            self.log("\n".join(f"{k:<20} {v}" for k, v in rows))
        return summary
