"""Build the DeepFM of a run configuration (the one place that maps config -> model)."""

import torch

from deepfm_dist.config import Config
from deepfm_dist.data.schema import feature_specs
from deepfm_dist.model.deepfm import DeepFM


def build_deepfm(cfg: Config, table_device: torch.device | str = "meta") -> DeepFM:
    """DeepFM with its tables on ``table_device`` (``meta`` for DMP to materialise shards;
    ``cpu`` for a plain unsharded model). Dense parameters come from the current RNG state:
    seed it first (``train.seed``) for a model that is the same at any world size."""
    return DeepFM(
        features=feature_specs(cfg.data),
        num_dense=len(cfg.data.dense),
        embedding_dim=cfg.model.embedding_dim,
        mlp=cfg.model.mlp,
        activation=cfg.model.activation,
        batch_norm=cfg.model.batch_norm,
        dropout=cfg.model.dropout,
        init_std=cfg.model.init_std,
        linear_kernel=cfg.model.linear_kernel,
        table_device=table_device,
    )


def table_names(cfg: Config) -> list[str]:
    """The run's tables in first-use order (shared tables once)."""
    return list(dict.fromkeys(f.table for f in feature_specs(cfg.data)))
