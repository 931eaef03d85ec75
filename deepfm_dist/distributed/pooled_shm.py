"""TorchRec's pooled-embedding all-to-all, fused with its layout changes, on shared memory.

Table-wise (and column-wise) sharding sends each rank's lookup output ``[B_global, D_mine]``
(rows grouped by destination rank) to the ranks and gives each ``[B_mine, D_1 + ... + D_W]``.
TorchRec's ``All2All_Pooled_Req`` / ``All2All_Pooled_Wait`` do it in about 8 passes over those
4 MB per step: a copy of the input into a "registered" buffer, the all-to-all, a ``cat`` of the
ranks' chunks. In backward, two ``contiguous`` + a ``cat`` regroup the gradient by rank, then
the all-to-all, then a ``div_`` by world size. On the shared-memory group
(``distributed/shm.py``) the same result takes 3 passes:

- forward: the peers' rows go into this rank's shared segment (one copy), and the output is
  assembled in one strided pass from this rank's own rows and the peers' segments;
- backward: each peer's gradient columns are divided by the world size straight into the
  segment, and the input gradient is assembled in one pass the same way.

The values are bitwise those of TorchRec's path: the same bytes are moved, and the gradient is divided by W with the same
``div``. This replaces a TorchRec function by name, so it is opt-in (``sharding.shm_all_to_all``)
and ``install()`` first checks that the function is the one this was written for. ``install()`` routes ``alltoall_pooled`` here for groups served by shared memory, and
leaves every other group (gloo, NCCL, quantized comms, sync collectives) to TorchRec. The
collectives run in the same order on every rank, as the protocol needs.
"""

from __future__ import annotations

import torch

from deepfm_dist.distributed import shm

_installed = False
calls = 0
"""Pooled all-to-alls this process ran through ``_PooledAllToAll`` (for logs and tests)."""


def _cumsum(xs: list[int]) -> list[int]:
    out = [0]
    for x in xs:
        out.append(out[-1] + x)
    return out


def _exchange(backend: shm.ShmProcessGroup, fill, chunk_bytes: list[int], assemble, fallback_input,
              out_splits: list[int], in_splits: list[int], dtype: torch.dtype) -> None:
    """One all-to-all. ``fill(buf)`` writes the chunks for the peers into this rank's segment
    (chunk p at its offset; this rank's own left out); then ``assemble(p, chunk, via_gloo)`` gets
    every rank's chunk for this rank (flat, ``dtype``; None for this rank's own, which the caller
    has). When any rank's payload does not fit the segments, every rank sends
    ``fallback_input()`` (flat, TorchRec's layout) through gloo instead, and ``assemble`` gets the
    chunks from there with ``via_gloo`` True. ``out_splits``: the elements this rank gets from
    each rank; ``in_splits``: those it sends to each."""
    seg, me, world = backend.segments, backend.rank(), backend.size()
    offsets = _cumsum(chunk_bytes)
    all_fit, parity = seg.exchange_written(fill, offsets, offsets[-1])
    if all_fit:
        item = torch.empty((), dtype=dtype).element_size()
        for p in range(world):
            if p == me:
                assemble(p, None, False)
            else:
                start, end = seg.received_range(p, parity, out_splits[p] * item)
                assemble(p, seg.data[p][parity][start:end].view(dtype), False)
        seg.finish()
        return
    seg.finish()
    received = torch.empty(sum(out_splits), dtype=dtype)
    backend.inner.alltoall_base(received, fallback_input(), out_splits, in_splits,
                                torch.distributed.AllToAllOptions()).wait()
    at = _cumsum(out_splits)
    for p in range(world):
        assemble(p, None if p == me else received[at[p]:at[p + 1]], True)


class _PooledAllToAll(torch.autograd.Function):
    """``[B_global, D_mine]`` (rows grouped by destination rank) -> ``[B_mine, sum_p D_p]``."""

    @staticmethod
    def forward(ctx, x, backend, batch_size_per_rank, dim_sum_per_rank, divide_grad):
        me, world = backend.rank(), backend.size()
        rows, cols = _cumsum(batch_size_per_rank), _cumsum(dim_sum_per_rank)
        x = x.contiguous()
        d_mine, b_mine = dim_sum_per_rank[me], batch_size_per_rank[me]
        out = torch.empty(b_mine, cols[-1], dtype=x.dtype)
        flat = x.view(-1).view(torch.uint8)
        row_bytes = d_mine * x.element_size()

        def fill(buf):
            for p in range(world):  # peer p's rows, contiguous in x already
                if p != me:
                    buf[rows[p] * row_bytes: rows[p + 1] * row_bytes].copy_(
                        flat[rows[p] * row_bytes: rows[p + 1] * row_bytes])

        def assemble(p, chunk, via_gloo):
            src = x[rows[me]:rows[me + 1]] if chunk is None else chunk.view(b_mine, dim_sum_per_rank[p])
            out[:, cols[p]:cols[p + 1]].copy_(src)

        _exchange(backend, fill, [b * row_bytes for b in batch_size_per_rank], assemble, lambda: x.view(-1),
                  [b_mine * d for d in dim_sum_per_rank], [b * d_mine for b in batch_size_per_rank], x.dtype)
        ctx.backend, ctx.sizes, ctx.divide = backend, (batch_size_per_rank, dim_sum_per_rank), divide_grad
        return out

    @staticmethod
    def backward(ctx, g):
        backend = ctx.backend
        batch_size_per_rank, dim_sum_per_rank = ctx.sizes
        me, world = backend.rank(), backend.size()
        rows, cols = _cumsum(batch_size_per_rank), _cumsum(dim_sum_per_rank)
        d_mine, b_mine = dim_sum_per_rank[me], batch_size_per_rank[me]
        # TorchRec divides the input gradient by the world size (comm_ops.GRADIENT_DIVISION);
        # the same div, applied before sending instead of after, gives the same bits.
        scale = world if ctx.divide else 1
        grad_x = torch.empty(rows[-1], d_mine, dtype=g.dtype)
        chunk_bytes = [b_mine * d * g.element_size() for d in dim_sum_per_rank]
        at = _cumsum(chunk_bytes)

        def fill(buf):
            for p in range(world):  # peer p's columns of the gradient, divided on the way in
                if p != me:
                    dst = buf[at[p]:at[p + 1]].view(g.dtype).view(b_mine, dim_sum_per_rank[p])
                    torch.div(g[:, cols[p]:cols[p + 1]], scale, out=dst)

        def assemble(p, chunk, via_gloo):
            dst = grad_x[rows[p]:rows[p + 1]]
            if chunk is None:
                torch.div(g[:, cols[me]:cols[me + 1]], scale, out=dst)
            elif via_gloo:  # gloo carried the undivided gradient, as in TorchRec's path
                torch.div(chunk.view(batch_size_per_rank[p], d_mine), scale, out=dst)
            else:
                dst.copy_(chunk.view(batch_size_per_rank[p], d_mine))

        _exchange(backend, fill, chunk_bytes, assemble,
                  lambda: torch.cat([g[:, cols[p]:cols[p + 1]].reshape(-1) for p in range(world)]),
                  [b * d_mine for b in batch_size_per_rank], [b_mine * d for d in dim_sum_per_rank], g.dtype)
        return grad_x, None, None, None, None


_EXPECTED_PARAMETERS = ["a2a_pooled_embs_tensor", "batch_size_per_rank", "dim_sum_per_rank",
                        "dim_sum_per_rank_tensor", "cumsum_dim_sum_per_rank_tensor", "group", "codecs",
                        "all_to_all_single_comm"]


def check_replaceable(comm_ops, dist_data) -> None:
    """Raise, saying what differs, unless TorchRec's ``alltoall_pooled`` is the function this
    module was written for (TorchRec 1.8): the same parameters, defined in ``comm_ops``, and the
    name ``PooledEmbeddingsAllToAll.forward`` calls it by in ``dist_data``."""
    import inspect

    fn = getattr(comm_ops, "alltoall_pooled", None)
    problems = []
    if fn is None or getattr(fn, "__module__", "") != "torchrec.distributed.comm_ops":
        problems.append(f"comm_ops.alltoall_pooled is {fn!r}, not TorchRec's own function")
    elif list(inspect.signature(fn).parameters) != _EXPECTED_PARAMETERS:
        problems.append(f"alltoall_pooled's parameters are {list(inspect.signature(fn).parameters)}, "
                        f"expected {_EXPECTED_PARAMETERS}")
    if getattr(dist_data, "alltoall_pooled", None) is not fn:
        problems.append("dist_data.alltoall_pooled is not comm_ops.alltoall_pooled")
    forward = getattr(getattr(dist_data, "PooledEmbeddingsAllToAll", None), "forward", None)
    if forward is None or "alltoall_pooled" not in forward.__code__.co_names:
        problems.append("PooledEmbeddingsAllToAll.forward no longer calls alltoall_pooled")
    if problems:
        raise RuntimeError("sharding.shm_fused_pooled: this TorchRec is not the one the fused pooled all-to-all "
                           "was written for (" + "; ".join(problems) + "); set sharding.shm_fused_pooled=false")


def install() -> None:
    """Route TorchRec's ``alltoall_pooled`` through ``_PooledAllToAll`` for shared-memory
    groups (idempotent; every other call goes to TorchRec's own function unchanged). Raises
    before changing anything when TorchRec's function is not the expected one."""
    global _installed
    if _installed:
        return
    from torchrec.distributed import comm_ops, dist_data
    from torchrec.distributed.types import NoWait

    check_replaceable(comm_ops, dist_data)
    original = comm_ops.alltoall_pooled

    def alltoall_pooled(a2a_pooled_embs_tensor, batch_size_per_rank, dim_sum_per_rank, dim_sum_per_rank_tensor=None,
                        cumsum_dim_sum_per_rank_tensor=None, group=None, codecs=None, all_to_all_single_comm=None):
        backend = shm.backend_of(group)
        if (backend is None or codecs is not None or backend.size() <= 1 or a2a_pooled_embs_tensor.device.type != "cpu"
                or comm_ops.get_use_sync_collectives()):
            return original(a2a_pooled_embs_tensor, batch_size_per_rank, dim_sum_per_rank, dim_sum_per_rank_tensor,
                            cumsum_dim_sum_per_rank_tensor, group, codecs, all_to_all_single_comm)
        # Synchronous, as every shared-memory collective is: the awaitable holds the result.
        global calls
        calls += 1
        return NoWait(_PooledAllToAll.apply(a2a_pooled_embs_tensor, backend, list(batch_size_per_rank),
                                            list(dim_sum_per_rank), comm_ops.GRADIENT_DIVISION))

    alltoall_pooled.__doc__ = original.__doc__
    comm_ops.alltoall_pooled = alltoall_pooled
    dist_data.alltoall_pooled = alltoall_pooled  # PooledEmbeddingsAllToAll calls it by this name
    _installed = True
