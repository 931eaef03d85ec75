"""Optimizers and the learning-rate schedule.

Tables are updated by a fused optimizer inside the sharded backward kernel (configured through
the sharder's ``fused_params``, see distributed/sharding.py); dense parameters by a regular
torch optimizer over the DDP-replicated parameters. One schedule scales both learning rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from deepfm_dist.config import CPU_EMBEDDING_OPTIMIZERS, OptimizerConfig


def check_embedding_optimizer(cfg: OptimizerConfig, device_type: str) -> None:
    """Fail before any collective when the fused kernel of this device lacks the optimizer."""
    if device_type == "cpu" and cfg.embedding not in CPU_EMBEDDING_OPTIMIZERS:
        raise ValueError(
            f"optimizer.embedding={cfg.embedding!r} is not supported on CPU: FBGEMM's fused CPU "
            f"kernel offers {', '.join(CPU_EMBEDDING_OPTIMIZERS)} (adam and partial_rowwise_adam need CUDA)"
        )
    if device_type == "cpu" and cfg.embedding_weight_decay > 0:
        # FBGEMM's CPU kernels take the weight-decay arguments and do not apply them: the rows
        # came out bitwise equal with and without (tests/test_training_system.py).
        raise ValueError(
            f"optimizer.embedding_weight_decay={cfg.embedding_weight_decay:g} is not applied on CPU: FBGEMM's "
            f"fused CPU kernel ignores weight decay, so the run would train without it; set it to 0 on CPU "
            f"(the CUDA kernels apply it)"
        )


def _dense_optimizer(cfg: OptimizerConfig, params) -> torch.optim.Optimizer:
    if cfg.dense == "adam":
        return torch.optim.Adam(params, lr=cfg.dense_lr, weight_decay=cfg.weight_decay)
    if cfg.dense == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.dense_lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.dense_lr, weight_decay=cfg.weight_decay)


@dataclass
class Optimizers:
    combined: CombinedOptimizer
    """Both optimizers as one ``KeyedOptimizer`` (what the pipeline steps and DCP saves)."""
    fused: KeyedOptimizer
    dense: KeyedOptimizerWrapper
    dense_params: list[torch.nn.Parameter]
    """Parameters the dense optimizer updates (DDP-replicated; gradient clipping applies here)."""


class ClippedKeyedOptimizer(KeyedOptimizerWrapper):
    """The dense optimizer, clipping the global gradient norm right before each step.

    Clipping lives in ``step`` because TorchRec's train pipeline runs backward and step itself;
    DDP has already all-reduced the gradients, so every rank clips by the same norm.
    """

    def __init__(self, params: dict, factory, max_norm: float):
        super().__init__(params, factory)
        self.max_norm = max_norm

    def step(self, closure=None) -> None:
        if self.max_norm > 0:
            grads = [p for p in self.params.values() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, self.max_norm)
        super().step(closure)


def build_optimizers(model: DistributedModelParallel, cfg: OptimizerConfig, grad_clip: float = 0.0) -> Optimizers:
    dense_named = dict(in_backward_optimizer_filter(model.named_parameters()))
    dense = ClippedKeyedOptimizer(dense_named, lambda params: _dense_optimizer(cfg, params), grad_clip)
    combined = CombinedOptimizer([("fused", model.fused_optimizer), ("dense", dense)])
    # Learning rates come from the config and the schedule, so only tensors are checkpointed.
    combined.save_param_groups(False)
    return Optimizers(combined, model.fused_optimizer, dense, list(dense_named.values()))


def lr_factor(cfg: OptimizerConfig, step: int, total_steps: int) -> float:
    """Multiplier of the base learning rates for the update made at ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = step - cfg.warmup_steps
    if cfg.decay == "none":
        return 1.0
    if cfg.decay == "step":
        return cfg.decay_gamma ** (t // cfg.decay_steps)
    # Without decay_steps the decay ends exactly at the last step (index total_steps - 1).
    span = cfg.decay_steps or max(1, total_steps - cfg.warmup_steps - 1)
    frac = min(1.0, t / span)
    if cfg.decay == "linear":
        shape = 1.0 - frac
    else:  # cosine
        shape = 0.5 * (1.0 + math.cos(math.pi * frac))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def batch_scale(cfg: OptimizerConfig, global_batch: int) -> float:
    """Multiplier of both base rates at this global batch (``optimizer.batch_scaling``)."""
    ratio = global_batch / cfg.reference_batch
    return {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[cfg.batch_scaling]


def set_learning_rates(opts: Optimizers, cfg: OptimizerConfig, factor: float) -> None:
    """Scale both groups. The fused kernels read the new rate at ``zero_grad``/``step``, i.e.
    before the backward that applies the next update."""
    for group in opts.fused.param_groups:
        group["lr"] = cfg.embedding_lr * factor
    for group in opts.dense.param_groups:
        group["lr"] = cfg.dense_lr * factor
