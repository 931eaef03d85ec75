"""The one batch type every data source yields and the trainer consumes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torchrec.datasets.utils import Batch as _TorchrecBatch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def _opt(t, fn):
    return None if t is None else fn(t)


@dataclass
class Batch(_TorchrecBatch):
    """torchrec's Batch plus per-row weights and, when configured, weighted features.

    Fields (``B`` = batch size, ``F_dense`` dense columns, ``F_sparse`` sparse columns):
        dense_features: float32 ``[B, F_dense]``.
        sparse_features: KeyedJaggedTensor of the unweighted sparse columns (keys in config
            order), values laid out key-major; no per-id weights.
        labels: float32 ``[B]`` in {0, 1}.
        weights: float32 ``[B]``; padding rows (weight 0) exist so that every rank runs
            the same number of steps in evaluation, they must not count in losses or
            metrics. None means all rows are real.
        weighted_features: KeyedJaggedTensor of the weighted sparse columns (``data.weighted``)
            with their per-id weights, or None. Kept apart from ``sparse_features`` because
            TorchRec's sharded unweighted tables apply any weights a KJT carries, and FBGEMM's
            CPU kernel gets the gradient of weighted *mean* pooling wrong (measured).
        passthrough: a ``pyarrow.Table`` of ``B`` rows, row i belonging to batch row i, with
            the columns the loader was asked to carry (``ParquetLoader(passthrough=...)``,
            e.g. a request id; any type, nulls kept; null on padding rows), or None. Host
            data for the caller, never model input: ``to()`` and ``pin_memory()`` hand the
            same table to the new batch, ``record_stream()`` has nothing to record.
    """

    weights: torch.Tensor | None = None
    weighted_features: KeyedJaggedTensor | None = None
    passthrough: Any = None  # pyarrow.Table | None (not imported here: batches are torch-only)

    def _map(self, fn: Callable[[Any], Any]) -> "Batch":
        """A new batch with ``fn`` applied to every tensor / KJT (the pass-through table as is)."""
        return Batch(
            dense_features=fn(self.dense_features),
            sparse_features=fn(self.sparse_features),
            labels=fn(self.labels),
            weights=_opt(self.weights, fn),
            weighted_features=_opt(self.weighted_features, fn),
            passthrough=self.passthrough,
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        if self.weights is not None:
            self.weights.record_stream(stream)
        if self.weighted_features is not None:
            self.weighted_features.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())
