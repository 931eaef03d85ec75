"""Pooled table rows + dense values -> DeepFM's MLP input and its wide term, in one autograd node.

A sharded ``EmbeddingBagCollection`` returns one ``[B, K * W]`` tensor with the K features'
pooled rows side by side, in the shards' key order (not the config's). Each row is
``[v (D) | w (1) | padding]`` (``model.deepfm.table_dim``). DeepFM needs:

* the MLP's input ``[x | v_1 .. v_Ns]``: the Nd dense values, then the sparse field vectors in
  field order (``DeepTower`` folds the dense vectors ``e_i`` into its first layer, so the dense
  fields ``x_i * e_i`` are never materialised for it);
* the wide term per example: the first-order sum (the sparse ``w`` plus ``x . w_dense``) plus
  the FM second-order term ``sum_{i<j} <v_i, v_j>`` (``model.fm``) over all F = Nd + Ns fields.

Built from separate ops (a broadcast multiply for the dense fields, ``to_dict`` / ``stack`` /
slices / ``cat`` for the sparse ones, the FM identity), the backward makes about a dozen passes
over ``[B, F, D]``-sized memory: zero-filled slice gradients, the FM gradient ``g (s - v_i)`` as
its own tensor, autograd adding it to the MLP's gradient, the copies back into the rows. Those
tensors are cold by then (the MLP ran in between), so each pass costs a trip to memory. Here:

* forward: one write of the sparse fields (one copy per field on CPU, one ``index_select`` on a
  GPU where a kernel launch per field would cost more), then one read for ``s = sum_i v_i`` and
  one for ``sum_i |v_i|^2``; the dense fields' share comes from a small ``[B, Nd, D]`` product;
* backward: one ``addcmul`` (the MLP's gradient minus ``g v_i``), then each field's gradient
  written once into the rows with the shared ``g s`` added on the way (into a zero-filled
  buffer, so the padding columns get a zero gradient and the fused optimizer leaves them
  untouched).

Figures are in the benchmark reports. ``tests/test_fm.py`` checks values and gradients
of both forms against the unfused composition and the FM term against a brute-force double loop.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torchrec import KeyedTensor


PER_FIELD_COPIES_ON = ("cpu",)
"""Device types on which fields are copied one by one (else: one index_select / index_copy_)."""


def _per_field_copies(t: torch.Tensor) -> bool:
    return t.device.type in PER_FIELD_COPIES_ON


class _FieldInteractions(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: torch.Tensor, dense: torch.Tensor | None, vectors: torch.Tensor | None,
                weights: torch.Tensor | None, order: list[int], order_index: torch.Tensor, dim: int):
        batch, width = values.shape[0], values.shape[1] // len(order)
        rows = values.reshape(batch, len(order), width)
        num_dense = dense.shape[1] if dense is not None else 0
        out = values.new_empty(batch, num_dense + len(order) * dim)  # [x | v_1 .. v_Ns]
        sparse = out[:, num_dense:].view(batch, len(order), dim)
        if _per_field_copies(values):
            # One strided copy per field: faster on CPU than index_select or advanced indexing
            # over the key dimension.
            for slot, key in enumerate(order):
                sparse[:, slot].copy_(rows[:, key, :dim])
        else:
            sparse.copy_(rows[:, :, :dim].index_select(1, order_index))
        # Summed in field order: the same result whatever the plan's key order (floating-point
        # sums depend on the order). Elementwise ops, not matmuls, so bf16 autocast leaves the
        # wide term in fp32.
        wide = rows[:, :, dim].index_select(1, order_index).sum(dim=1)
        s = sparse.sum(dim=1)  # [B, D]: sum of all field vectors, dense ones added below
        # sum_i |v_i|^2 as a squared norm: one pass, no [B, F, D] temporary.
        squares = torch.linalg.vector_norm(sparse, dim=(1, 2)).square()
        if dense is not None:
            out[:, :num_dense].copy_(dense)
            dense_fields = dense.unsqueeze(-1) * vectors  # [B, Nd, D] (small: Nd of F fields)
            s = s + dense_fields.sum(dim=1)
            squares = squares + dense_fields.square().sum(dim=(1, 2))
            wide = wide + (dense * weights).sum(dim=1)
        wide = wide + 0.5 * (s.square().sum(dim=1) - squares)
        ctx.meta = (batch, width, num_dense, order, dim)
        ctx.save_for_backward(out, s, dense, vectors, weights, order_index)
        return out, wide

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor, grad_wide: torch.Tensor):
        # Both gradients are tensors: autograd materialises an unused output's as zeros.
        batch, width, num_dense, order, dim = ctx.meta
        out, s, dense, vectors, weights, order_index = ctx.saved_tensors
        sparse = out[:, num_dense:].view(batch, len(order), dim)
        g = grad_wide
        grad_sparse = grad_out[:, num_dense:].view(batch, len(order), dim)
        # d wide / d v_i = g (s - v_i): the -g v_i part joins the MLP's gradient in one pass; the
        # g s part is the same for every field and is added while writing each field's rows.
        total = torch.addcmul(grad_sparse, sparse, g[:, None, None], value=-1)  # [B, Ns, D]
        gs = s * g[:, None]  # [B, D]
        # Zero-filled whole, so padding columns get a zero gradient. Filling only the padding
        # is no cheaper: the cost is bringing the fresh [B, K, W] buffer into cache, not the fill.
        grad_rows = out.new_zeros(batch, len(order), width)
        if _per_field_copies(out):
            for slot, key in enumerate(order):
                torch.add(total[:, slot], gs, out=grad_rows[:, key, :dim])
        else:
            grad_rows[:, :, :dim].index_copy_(1, order_index, total + gs[:, None])
        grad_rows[:, :, dim].copy_(g.unsqueeze(1).expand(batch, len(order)))

        grad_dense = grad_vectors = grad_weights = None
        if dense is not None:
            # Field i is x_i e_i: d wide / d e_i = sum_b g x_i (s - x_i e_i), d wide / d x_i =
            # g (e_i . s - x_i |e_i|^2) + g w_i. The MLP's share reaches e through the folded
            # first layer (DeepTower) and x through grad_out[:, :Nd].
            gx = dense * g[:, None]  # [B, Nd]
            if ctx.needs_input_grad[1]:
                fm = (s.unsqueeze(1) * vectors).sum(dim=-1) - dense * vectors.square().sum(dim=-1)  # [B, Nd]
                grad_dense = grad_out[:, :num_dense] + g[:, None] * (fm + weights)
            if ctx.needs_input_grad[2]:
                grad_vectors = (gx.unsqueeze(-1) * s.unsqueeze(1)).sum(dim=0) - vectors * (gx * dense).sum(dim=0)[:, None]
            if ctx.needs_input_grad[3]:
                grad_weights = gx.sum(dim=0)
        return grad_rows.view(batch, len(order) * width), grad_dense, grad_vectors, grad_weights, None, None, None


_ORDERS: dict[tuple, tuple[list[int], torch.Tensor]] = {}
"""(keys, features, device) -> (slot of each feature, the same as an index tensor on the device):
made once per plan, so no host-to-device copy per step."""


@torch.fx.wrap
def field_interactions(
    pooled: list[KeyedTensor], features: list[str], dim: int, dense: torch.Tensor | None = None,
    dense_vectors: torch.Tensor | None = None, dense_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The deep tower's input and the wide term (first order + FM second order) from pooled rows.

    Args:
        pooled: KeyedTensors (one per EmbeddingBagCollection: plain, weighted) whose keys
            together are exactly ``features`` (any order), every row ``W >= dim + 1`` wide:
            ``[v (dim) | w | padding]``.
        features: the sparse fields in model order.
        dim: D.
        dense: [B, Nd] dense values or None; with ``dense_vectors`` [Nd, D] (dense field i is
            ``x_i * e_i``) and ``dense_weights`` [Nd] (first order ``x . w``).
    Returns:
        (mlp_input [B, Nd + Ns * D] contiguous: the dense values, then the sparse field
         vectors in field order (``DeepTower`` folds e into its first layer, so the dense
         fields themselves are never materialised for it);
         wide [B] = sum over features of w + x . w_dense + sum_{i<j} <v_i, v_j> over all
         F = Nd + Ns fields, dense ones included).

    fx-wrapped (here and in model/deepfm.py, which calls it): TrainPipelineSparseDist traces
    the model, and the key lookup needs the real KeyedTensor, not a proxy.
    """
    keys = [k for kt in pooled for k in kt.keys()]
    widths = [w for kt in pooled for w in kt.length_per_key()]
    if sorted(keys) != sorted(features):
        raise ValueError(f"pooled embeddings carry keys {keys}, the model expects {features}")
    if len(set(widths)) != 1 or widths[0] <= dim:
        raise ValueError(f"pooled rows must share one width > {dim}: {dict(zip(keys, widths))}")
    if (dense is None) != (dense_vectors is None) or (dense is None) != (dense_weights is None):
        raise ValueError("dense, dense_vectors and dense_weights come together or not at all")
    # Two collections (plain and weighted features): one extra copy to put them side by side.
    values = pooled[0].values() if len(pooled) == 1 else torch.cat([kt.values() for kt in pooled], dim=1)
    cache_key = (tuple(keys), tuple(features), values.device)
    if cache_key not in _ORDERS:
        slot = {k: i for i, k in enumerate(keys)}
        order = [slot[f] for f in features]
        _ORDERS[cache_key] = (order, torch.tensor(order, device=values.device))
    order, order_index = _ORDERS[cache_key]
    return _FieldInteractions.apply(values, dense, dense_vectors, dense_weights, order, order_index, dim)
