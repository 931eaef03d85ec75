"""Evaluation: when (``train.eval_every``, every epoch's end, the run's end) and the exact
AUC, logloss, normalized entropy and calibration over every rank's validation rows."""

from __future__ import annotations

import ctypes
import ctypes.util
import math

import pyarrow as pa
import torch
from torch import nn

from deepfm_dist.distributed.env import DistEnv
from deepfm_dist.logs import MetricsLogger
from deepfm_dist.metrics import global_metrics
from deepfm_dist.step import autocast


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


@torch.no_grad()
def evaluate(model: nn.Module, reader, env: DistEnv, precision: str = "fp32") -> dict:
    """Score this rank's share of the validation set; ``metrics.global_metrics`` over all
    ranks' rows (auc, logloss, ne, calibration, rows)."""
    sync_dense_buffers(model, env)
    release_host_memory()
    model.eval()
    logits, labels = [], []
    for batch in reader:
        batch = batch.to(env.device, non_blocking=True)
        with autocast(env.device, precision):
            _, (_, lg, lb, w) = model(batch)
        # Only the real rows (padding has weight 0), as new tensors: what a batch's outputs
        # reference (its input buffers, the model's) must not stay alive for the whole pass.
        real = w > 0
        logits.append(lg.float()[real])
        labels.append(lb.float()[real])
    model.train()
    return global_metrics(torch.cat(logits), torch.cat(labels))


class Evaluator:
    """Owns the evaluation schedule and records each result. Collective: every rank runs it."""

    def __init__(self, model: nn.Module, reader, env: DistEnv, metrics: MetricsLogger, *, every: int,
                 precision: str, samples_per_step: int):
        self.model, self.reader, self.env, self.metrics = model, reader, env, metrics
        self.every, self.precision, self.samples_per_step = every, precision, samples_per_step
        self.results: list[dict] = []

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def run(self, step: int, epoch: int) -> dict:
        m = evaluate(self.model, self.reader, self.env, self.precision)
        record = {"step": step, "epoch": epoch, "samples": step * self.samples_per_step, "val_auc": m["auc"],
                  "val_logloss": m["logloss"], "val_ne": m["ne"], "val_calibration": m["calibration"],
                  "val_rows": m["rows"]}
        self.metrics.write(**record)
        self.metrics.log(f"eval step {step} (epoch {epoch}): val AUC {m['auc']:.4f} logloss {m['logloss']:.4f} "
                         f"NE {m['ne']:.4f} calibration {m['calibration']:.3f} ({m['rows']:,} rows)")
        if m["rows"] and math.isnan(m["auc"]):
            self.metrics.log("val AUC undefined: every validation row has the same label (AUC compares clicks with "
                             "non-clicks); written as null in metrics.jsonl and summary.json")
        self.results.append(record)
        return record

    def last_step(self) -> int | None:
        return self.results[-1]["step"] if self.results else None


def release_host_memory() -> None:
    """Hands memory freed by finished work back to the OS before the next phase allocates its own:
    Arrow's pool (mimalloc keeps each thread's freed pages) and glibc's heap (the launchers set
    MALLOC_TRIM_THRESHOLD_ high so that steps reuse their buffers). Without it the training
    loader's freed row groups stay resident while the validation loader reads its own."""
    pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only
    except OSError:
        return None


_LIBC = _libc()
