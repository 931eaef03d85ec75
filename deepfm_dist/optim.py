"""Optimizers: the fused embedding optimizer (inside the sharded kernels) + a dense one."""

from __future__ import annotations

import torch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from deepfm_dist.config import OptimizerConfig


def dense_optimizer_factory(cfg: OptimizerConfig):
    def make(params):
        if cfg.dense == "adam":
            return torch.optim.Adam(params, lr=cfg.dense_lr, weight_decay=cfg.weight_decay)
        if cfg.dense == "adagrad":
            return torch.optim.Adagrad(params, lr=cfg.dense_lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(params, lr=cfg.dense_lr, weight_decay=cfg.weight_decay)

    return make


def build_optimizer(model: DistributedModelParallel, cfg: OptimizerConfig) -> CombinedOptimizer:
    """Fused table optimizer (its update runs inside backward) + the dense optimizer over the
    DDP-replicated parameters (and data_parallel tables, if any)."""
    dense_params = dict(in_backward_optimizer_filter(model.named_parameters()))
    dense = KeyedOptimizerWrapper(dense_params, dense_optimizer_factory(cfg))
    return CombinedOptimizer([model.fused_optimizer, dense])
