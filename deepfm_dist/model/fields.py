"""Pooled table rows -> DeepFM's field matrix and first-order sum, in one autograd node.

A sharded ``EmbeddingBagCollection`` returns one ``[B, K * W]`` tensor with the K features'
pooled rows side by side, in the shards' key order (not the config's). Each row is
``[v (D) | w (1) | padding]`` (``model.deepfm.table_dim``). DeepFM needs the vectors in field
order, after the dense fields, as one ``[B, F, D]`` tensor (the FM term reads it, the MLP reads
it flattened), and the sum of the first-order weights.

Done with ``to_dict`` + ``stack`` + slices + ``cat``, autograd records ~60 nodes per step and the
backward makes about six passes over the rows (zero-filled slice and select gradients, their
sum, the stack's and the split's copies). Here it is one copy per field forward (on CPU; one
``index_select`` on a GPU, where a kernel launch per field would cost more), and backward one
zero-filled ``[B, K, W]`` gradient written once: +5% per 2-rank CPU step
(benchmarks/cpu-2core_202612.md). Padding columns get a zero gradient, as before, so the fused
optimizer leaves them untouched. ``tests/test_fm.py`` checks values and gradients of both forms
against the stack/cat composition bit for bit.
"""

from __future__ import annotations

import torch
from torchrec import KeyedTensor


PER_FIELD_COPIES_ON = ("cpu",)
"""Device types on which fields are copied one by one (else: one index_select / index_copy_)."""


def _per_field_copies(t: torch.Tensor) -> bool:
    return t.device.type in PER_FIELD_COPIES_ON


class _GatherFields(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: torch.Tensor, dense_fields: torch.Tensor | None, order: list[int],
                order_index: torch.Tensor, dim: int):
        batch, width = values.shape[0], values.shape[1] // len(order)
        rows = values.reshape(batch, len(order), width)
        num_dense = dense_fields.shape[1] if dense_fields is not None else 0
        fields = values.new_empty(batch, num_dense + len(order), dim)
        if dense_fields is not None:
            fields[:, :num_dense].copy_(dense_fields)
        if _per_field_copies(values):
            # One strided copy per field: measured faster on CPU than index_select or advanced
            # indexing over the key dimension (0.19 vs 0.26-0.72 ms for 26 x [2048, 16]).
            for slot, key in enumerate(order):
                fields[:, num_dense + slot].copy_(rows[:, key, :dim])
        else:
            # On a GPU one gather kernel beats a launch per field.
            fields[:, num_dense:].copy_(rows[:, :, :dim].index_select(1, order_index))
        # Summed in field order, as the unfused model did: the same result whatever the plan's
        # key order (floating-point sums depend on the order).
        first_order = rows[:, :, dim].index_select(1, order_index).sum(dim=1)
        ctx.meta = (batch, width, num_dense, order, dim)
        ctx.save_for_backward(order_index)
        return fields, first_order

    @staticmethod
    def backward(ctx, grad_fields: torch.Tensor, grad_first: torch.Tensor):
        batch, width, num_dense, order, dim = ctx.meta
        (order_index,) = ctx.saved_tensors
        grad_rows = grad_fields.new_zeros(batch, len(order), width)
        if _per_field_copies(grad_fields):
            for slot, key in enumerate(order):
                grad_rows[:, key, :dim].copy_(grad_fields[:, num_dense + slot])
        else:
            grad_rows[:, :, :dim].index_copy_(1, order_index, grad_fields[:, num_dense:])
        grad_rows[:, :, dim].copy_(grad_first.unsqueeze(1).expand(batch, len(order)))
        grad_dense = grad_fields[:, :num_dense] if ctx.needs_input_grad[1] else None  # False without dense fields
        return grad_rows.view(batch, len(order) * width), grad_dense, None, None, None


_ORDERS: dict[tuple, tuple[list[int], torch.Tensor]] = {}
"""(keys, features, device) -> (slot of each feature, the same as an index tensor on the device):
made once per plan, so no host-to-device copy per step."""


@torch.fx.wrap
def gather_fields(
    pooled: list[KeyedTensor], features: list[str], dim: int, dense_fields: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Field vectors and first-order sum from pooled rows, selected by feature name.

    Args:
        pooled: KeyedTensors (one per EmbeddingBagCollection: plain, weighted) whose keys
            together are exactly ``features`` (any order), every row ``W >= dim + 1`` wide:
            ``[v (dim) | w | padding]``.
        features: the sparse fields in model order.
        dim: D.
        dense_fields: [B, Nd, D] or None: placed before the sparse fields.
    Returns:
        (fields [B, Nd + Ns, D] contiguous, first_order [B] = sum over features of w).

    fx-wrapped (here and in model/deepfm.py, which calls it): TrainPipelineSparseDist traces
    the model, and the key lookup needs the real KeyedTensor, not a proxy.
    """
    keys = [k for kt in pooled for k in kt.keys()]
    widths = [w for kt in pooled for w in kt.length_per_key()]
    if sorted(keys) != sorted(features):
        raise ValueError(f"pooled embeddings carry keys {keys}, the model expects {features}")
    if len(set(widths)) != 1 or widths[0] <= dim:
        raise ValueError(f"pooled rows must share one width > {dim}: {dict(zip(keys, widths))}")
    # Two collections (plain and weighted features): one extra copy to put them side by side.
    values = pooled[0].values() if len(pooled) == 1 else torch.cat([kt.values() for kt in pooled], dim=1)
    cache_key = (tuple(keys), tuple(features), values.device)
    if cache_key not in _ORDERS:
        slot = {k: i for i, k in enumerate(keys)}
        order = [slot[f] for f in features]
        _ORDERS[cache_key] = (order, torch.tensor(order, device=values.device))
    order, order_index = _ORDERS[cache_key]
    return _GatherFields.apply(values, dense_fields, order, order_index, dim)
