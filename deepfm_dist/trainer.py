"""The training loop: build, shard, train, evaluate, report. Rank 0 talks; every rank computes."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from deepfm_dist.config import Config
from deepfm_dist.data import ParquetBatchReader, resolve_parquet_paths
from deepfm_dist.distributed.env import DistEnv, destroy, init_distributed, set_cpu_threads
from deepfm_dist.distributed.sharding import describe_plan, plan_report, save_plan, shard_model
from deepfm_dist.loss import DeepFMTrain
from deepfm_dist.metrics import global_auc_logloss
from deepfm_dist.model import DeepFM, table_name
from deepfm_dist.optim import build_optimizer


def quiet_library_noise() -> None:
    """Silence messages that say nothing to our users (see shared/TORCHREC_CPU.md)."""
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    logging.getLogger("torchrec").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchrec")


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
    model = DeepFM(
        sparse_features=cfg.data.sparse,
        table_sizes=cfg.data.table_sizes(),
        num_dense=len(cfg.data.dense),
        embedding_dim=cfg.model.embedding_dim,
        mlp=cfg.model.mlp,
        activation=cfg.model.activation,
        batch_norm=cfg.model.batch_norm,
        dropout=cfg.model.dropout,
        init_std=cfg.model.init_std,
        table_device="meta",
    )
    return DeepFMTrain(model)


def make_reader(cfg: Config, env: DistEnv, files: list[str], *, train: bool) -> ParquetBatchReader:
    batch = cfg.train.batch_size if train else (cfg.train.val_batch_size or cfg.train.batch_size)
    return ParquetBatchReader(
        files,
        label=cfg.data.label,
        dense=cfg.data.dense,
        sparse=cfg.data.sparse,
        num_embeddings=cfg.data.table_sizes(),
        batch_size=batch,
        rank=env.rank,
        world_size=env.world_size,
        pad_last=not train,
        hash_seed=cfg.data.hash_seed,
        pin_memory=env.device.type == "cuda",
    )


@torch.no_grad()
def evaluate(model: nn.Module, reader: ParquetBatchReader, env: DistEnv) -> tuple[float, float, int]:
    """Score this rank's share of the validation set; exact AUC/logloss over all ranks' rows."""
    model.eval()
    logits, labels, weights = [], [], []
    for batch in reader:
        batch = batch.to(env.device, non_blocking=True)
        _, (_, lg, lb, w) = model(batch)
        logits.append(lg)
        labels.append(lb)
        weights.append(w)
    model.train()
    keep = torch.cat(weights) > 0  # padding rows (weight 0) are not scored
    return global_auc_logloss(torch.cat(logits)[keep].float(), torch.cat(labels)[keep].float())


def find_oracle(val_specs: list[str]) -> dict | None:
    """The synthetic generator's oracle.json beside the validation folder, if there is one."""
    for spec in val_specs:
        path = os.path.join(os.path.dirname(os.path.abspath(spec.rstrip("/"))), "oracle.json")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    return None


@dataclass
class Throughput:
    """Training throughput over time spent in training steps (evaluation excluded)."""

    samples: int = 0
    seconds: float = 0.0
    window: list[tuple[int, float]] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def write_json_atomic(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def train(cfg: Config) -> dict:
    """Run training as configured; every rank returns the same summary dict."""
    quiet_library_noise()
    # Resolve paths and read the Parquet footers before joining the process group: every
    # rank checks the same files, so bad input fails all ranks alike, before any collective.
    train_files = resolve_parquet_paths(cfg.data.train, "data.train")
    val_files = resolve_parquet_paths(cfg.data.val, "data.val")
    env = init_distributed(cfg.train.device)
    try:
        return _train(cfg, env, train_files, val_files)
    finally:
        destroy()


def _train(cfg: Config, env: DistEnv, train_files: list[str], val_files: list[str]) -> dict:
    log = RankLogger(env)
    threads = set_cpu_threads(cfg.train.threads, env.local_world_size) if env.device.type == "cpu" else None
    train_reader = make_reader(cfg, env, train_files, train=True)
    val_reader = make_reader(cfg, env, val_files, train=False)
    if len(train_reader) == 0:
        raise ValueError(
            f"data.train has {train_reader.num_rows} rows: fewer than world_size ({env.world_size}) x "
            f"train.batch_size ({cfg.train.batch_size}); not one full batch per rank"
        )
    log(
        f"deepfm-dist: world_size={env.world_size} backend={env.backend} device={env.device.type}"
        + (f" threads/rank={threads}" if threads else "")
    )
    log(
        f"data: train {train_reader.num_rows:,} rows in {len(train_files)} files "
        f"({len(train_reader)} steps/epoch of {cfg.train.batch_size} x {env.world_size}), "
        f"val {val_reader.num_rows:,} rows in {len(val_files)} files"
    )

    module = build_model(cfg)
    model, plan = shard_model(module, cfg, env)
    optimizer = build_optimizer(model, cfg.optimizer)
    placements = describe_plan(plan, env.world_size, [table_name(f) for f in cfg.data.sparse])
    if env.is_main:
        os.makedirs(cfg.run_dir, exist_ok=True)
        save_plan(placements, os.path.join(cfg.run_dir, "plan.json"))
        log(plan_report(placements))

    steps_per_epoch = len(train_reader)
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    global_batch = cfg.train.batch_size * env.world_size
    bar = None
    if env.is_main and cfg.train.progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)

    tp = Throughput()
    step = 0
    evals: list[dict] = []
    last_loss = float("nan")
    model.train()
    for epoch in range(cfg.train.epochs):
        if step >= total_steps:
            break
        window_start, window_steps = time.perf_counter(), 0
        for batch in train_reader:
            if step >= total_steps:
                break
            t0 = time.perf_counter()
            batch = batch.to(env.device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss, _ = model(batch)
            loss.backward()
            optimizer.step()
            step += 1
            window_steps += 1
            tp.samples += global_batch
            tp.seconds += time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
            if step % cfg.train.log_every == 0 or step == total_steps:
                last_loss = loss.item()  # note: host-device sync point, on log steps only
                now = time.perf_counter()
                rate = window_steps * global_batch / (now - window_start)
                window_start, window_steps = now, 0
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.4f}", samples_s=f"{rate:,.0f}")
                else:
                    log(f"epoch {epoch + 1} step {step}/{total_steps} | loss {last_loss:.4f} | {rate:,.0f} samples/s")
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
                auc, ll, n = evaluate(model, val_reader, env)
                evals.append({"step": step, "samples": step * global_batch, "val_auc": auc, "val_logloss": ll})
                log(f"eval step {step}: val AUC {auc:.4f} logloss {ll:.4f} ({n:,} rows)")
                window_start, window_steps = time.perf_counter(), 0
        auc, ll, n = evaluate(model, val_reader, env)
        evals.append({"step": step, "samples": step * global_batch, "val_auc": auc, "val_logloss": ll})
        log(f"eval epoch {epoch + 1} (step {step}): val AUC {auc:.4f} logloss {ll:.4f} ({n:,} rows)")
    if bar is not None:
        bar.close()
    last_loss = loss.item()

    final = evals[-1]
    summary = {
        "world_size": env.world_size,
        "backend": env.backend,
        "device": env.device.type,
        "steps": step,
        "epochs": cfg.train.epochs,
        "batch_size_per_rank": cfg.train.batch_size,
        "train_samples": tp.samples,
        "train_seconds": tp.seconds,
        "train_samples_per_s": tp.per_s,
        "train_samples_per_s_per_rank": tp.per_s / env.world_size,
        "last_loss": last_loss,
        "val_auc": final["val_auc"],
        "val_logloss": final["val_logloss"],
        "val_rows": n,
        "evals": evals,
        "plan_file": os.path.join(cfg.run_dir, "plan.json"),
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
            ("steps", f"{step}"),
            ("train samples", f"{tp.samples:,}"),
            ("samples/s", f"{tp.per_s:,.0f} ({tp.per_s / env.world_size:,.0f} per rank)"),
            ("val AUC", f"{final['val_auc']:.4f}"),
            ("val logloss", f"{final['val_logloss']:.4f}"),
        ]
        if oracle is not None:
            rows.append(("oracle val AUC", f"{oracle.get('val_auc', float('nan')):.4f}"))
            rows.append(("oracle val logloss", f"{oracle.get('val_logloss', float('nan')):.4f}"))
        rows.append(("summary", os.path.join(cfg.run_dir, "summary.json")))
        log("\n".join(f"{k:<20} {v}" for k, v in rows))
    return summary
