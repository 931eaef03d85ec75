"""The one batch type every data source yields and the trainer consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.datasets.utils import Batch as _TorchrecBatch


@dataclass
class Batch(_TorchrecBatch):
    """torchrec's Batch plus per-row weights: 1.0 for real rows, 0.0 for padding rows.

    Fields (``B`` = batch size, ``F_dense`` dense columns, ``F_sparse`` sparse columns):
        dense_features: float32 ``[B, F_dense]``.
        sparse_features: KeyedJaggedTensor, keys = sparse column names, one id per row
            and key, values laid out key-major (``[F_sparse * B]``).
        labels: float32 ``[B]`` in {0, 1}.
        weights: float32 ``[B]``; padding rows (weight 0) exist so that every rank runs
            the same number of steps in evaluation, they must not count in losses or
            metrics. None means all rows are real.
    """

    weights: torch.Tensor | None = None

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            weights=(
                None
                if self.weights is None
                else self.weights.to(device=device, non_blocking=non_blocking)
            ),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        if self.weights is not None:
            self.weights.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
            weights=None if self.weights is None else self.weights.pin_memory(),
        )
