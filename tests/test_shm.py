"""Shared-memory comms (distributed/shm.py) on 2 real CPU ranks against gloo, op for op."""

from __future__ import annotations

import glob
import time

import pytest
import torch

from deepfm_dist.distributed import shm
from tests.distributed_helpers import launch

pytestmark = pytest.mark.skipif(not shm.supported(), reason="shared-memory comms are x86-64 only")


def _ops_worker() -> dict:
    import torch.distributed as dist

    from deepfm_dist.distributed.env import destroy, init_distributed

    env = init_distributed("cpu")
    torch.set_num_threads(1)
    fast = shm.new_shm_group(capacity_mb=1.0)  # 1 MiB: the larger operations below fall back
    rank, world = env.rank, env.world_size
    g = torch.Generator().manual_seed(100 + rank)
    checked = {"a2a": 0, "a2a_fallback": 0, "allreduce": 0, "delegated": 0}
    for step in range(40):
        # Uneven splits agreed on through a gloo all-to-all of the sizes (as TorchRec does).
        send = torch.randint(0, 50, (world,), generator=g)
        if step % 10 == 9:
            send[1 - rank] = 40_000 if rank == 0 else 3  # rank 0's payload > 1 MiB, rank 1's tiny
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        dtype = [torch.float32, torch.int64, torch.int32, torch.bfloat16][step % 4]
        x = (torch.randn(int(send.sum()), 5, generator=g) * 100).to(dtype)
        ref, out = (torch.empty(int(recv.sum()), 5, dtype=dtype) for _ in range(2))
        dist.all_to_all_single(ref, x, recv.tolist(), send.tolist())
        work = dist.all_to_all_single(out, x, recv.tolist(), send.tolist(), group=fast, async_op=True)
        work.wait()
        assert torch.equal(out, ref), (rank, step, dtype)
        checked["a2a_fallback" if step % 10 == 9 else "a2a"] += 1

        y = torch.randn(1000 + step, generator=g)
        ref_sum, got = y.clone(), y.clone()
        dist.all_reduce(ref_sum)
        dist.all_reduce(got, group=fast)
        assert torch.equal(got, ref_sum), (rank, step)  # 2 ranks: a + b, exactly as gloo
        checked["allreduce"] += 1

        m = torch.randn(7, generator=g)  # not SUM: handed to gloo
        ref_max, got_max = m.clone(), m.clone()
        dist.all_reduce(ref_max, op=dist.ReduceOp.MAX)
        dist.all_reduce(got_max, op=dist.ReduceOp.MAX, group=fast)
        assert torch.equal(got_max, ref_max)
        checked["delegated"] += 1
    gathered = [torch.empty(3) for _ in range(world)]
    dist.all_gather(gathered, torch.full((3,), float(rank)), group=fast)  # delegated
    assert [int(t[0]) for t in gathered] == list(range(world))
    dist.barrier(group=fast)
    backend = dist.get_backend(fast)
    destroy()
    return {"checked": checked, "backend": backend}


def test_all_to_all_and_all_reduce_equal_gloo_with_fallback_and_delegation():
    before = set(glob.glob("/dev/shm/deepfm-*"))
    results = launch(_ops_worker, (), nproc=2)
    for rank in (0, 1):
        assert results[rank]["backend"] == shm.BACKEND
        assert results[rank]["checked"] == {"a2a": 36, "a2a_fallback": 4, "allreduce": 40, "delegated": 40}
    assert set(glob.glob("/dev/shm/deepfm-*")) == before, "segments are unlinked once every rank mapped them"


def _peer_leaves_worker() -> str:
    import torch.distributed as dist

    from deepfm_dist.distributed.env import destroy, init_distributed

    env = init_distributed("cpu")
    fast = shm.new_shm_group(capacity_mb=1.0)
    x = torch.ones(4)
    dist.all_reduce(x, group=fast)
    if env.rank == 1:
        destroy()
        return "left"  # exits without joining the next collective
    t0 = time.monotonic()
    try:
        dist.all_reduce(x, group=fast)
    except RuntimeError as e:
        return f"{time.monotonic() - t0:.1f} s: {e}"
    finally:
        destroy()
    return "no error"


def test_a_peer_that_exits_stops_the_waiting_rank_at_once():
    results = launch(_peer_leaves_worker, (), nproc=2)
    assert results[1] == "left"
    seconds, message = results[0].split(" s: ", 1)
    assert "rank 1" in message and ("exited" in message or "gone" in message), results[0]
    assert float(seconds) < 20, results[0]


def test_too_little_shared_memory_is_found_before_any_segment(monkeypatch):
    """A container's small /dev/shm: the check says no (auto then keeps gloo) and says why."""
    need_one = shm.segment_bytes(32 * 2**20)
    monkeypatch.setattr(shm, "free_bytes", lambda: 2 * need_one - 1)
    ok, found = shm.room_on_every_rank(32, local_world_size=2)
    assert not ok and "MiB free" in found and "need" in found
    monkeypatch.setattr(shm, "free_bytes", lambda: 2 * need_one)
    assert shm.room_on_every_rank(32, local_world_size=2)[0]


def _repeat_worker() -> list[float]:
    import gc

    import torch.distributed as dist

    from deepfm_dist.distributed.env import destroy, init_distributed

    init_distributed("cpu")
    base = shm.free_bytes()
    held = []
    for _ in range(2):
        group = shm.new_shm_group(capacity_mb=4.0)
        x = torch.ones(8)
        dist.all_reduce(x, group=group)
        assert torch.equal(x, torch.full((8,), 2.0))
        reserved = base - shm.free_bytes()
        dist.destroy_process_group(group)  # this group alone
        del group
        gc.collect()
        dist.barrier()
        held.append((reserved, base - shm.free_bytes()))
    destroy()
    return held


def test_destroying_a_group_releases_its_segments():
    """A process that shards models repeatedly (notebooks, tests) does not accumulate segments."""
    held = launch(_repeat_worker, (), nproc=2)[0]
    segments = 2 * shm.segment_bytes(4 * 2**20)
    for reserved, after in held:
        assert reserved >= segments * 0.99, (reserved, segments)
        assert after < segments / 4, (after, segments)


def _late_peer_worker() -> dict:
    import torch.distributed as dist

    from deepfm_dist.distributed.env import destroy, init_distributed

    env = init_distributed("cpu")
    fast = shm.new_shm_group(capacity_mb=1.0)
    x = torch.ones(1000)
    dist.all_reduce(x, group=fast)  # both present: whatever this waited is before the mark
    before = shm.peer_wait_seconds()
    if env.rank == 1:
        time.sleep(0.5)  # rank 0 arrives first and must wait for this
    dist.all_reduce(x, group=fast)
    waited = shm.peer_wait_seconds() - before
    dist.barrier(group=fast)
    destroy()
    return {"rank": env.rank, "waited": waited, "sum": float(x[0])}


def test_peer_wait_counts_the_time_a_rank_is_blocked_on_a_late_peer():
    results = launch(_late_peer_worker, (), nproc=2)
    early, late = results[0], results[1]
    assert early["sum"] == late["sum"] == 4.0
    assert early["waited"] >= 0.45, early  # it waited out rank 1's sleep
    assert late["waited"] < 0.25, late  # the last to arrive barely waits


def _fused_pooled_worker() -> dict:
    import torch.distributed as dist
    from torchrec.distributed import comm_ops

    from deepfm_dist.distributed import pooled_shm
    from deepfm_dist.distributed.env import destroy, init_distributed

    env = init_distributed("cpu")
    torch.set_num_threads(1)
    pooled_shm.install()
    fast = shm.new_shm_group(capacity_mb=1.0)
    backend = shm.backend_of(fast)
    assert backend is not None and shm.backend_of(None) is None
    rank = env.rank
    dims = [12, 20]  # each rank's tables are a different width
    checked = []
    for batch_sizes in ([3, 5], [9000, 7000]):  # fits the 1 MiB segments; does not (gloo fallback)
        g = torch.Generator().manual_seed(10 + rank)
        x = torch.randn(sum(batch_sizes), dims[rank], generator=g, requires_grad=True)
        w = torch.randn(batch_sizes[rank], sum(dims), generator=g)
        ref_x = x.detach().clone().requires_grad_(True)
        before = pooled_shm.calls
        out = comm_ops.alltoall_pooled(x, batch_sizes, dims, group=fast).wait()  # the fused path
        assert pooled_shm.calls == before + 1
        (out * w).sum().backward()
        ref = comm_ops.alltoall_pooled(ref_x, batch_sizes, dims, group=dist.group.WORLD).wait()  # TorchRec's, gloo
        assert pooled_shm.calls == before + 1
        (ref * w).sum().backward()
        assert out.shape == (batch_sizes[rank], sum(dims))
        assert torch.equal(out, ref), (rank, batch_sizes)
        assert torch.equal(x.grad, ref_x.grad), (rank, batch_sizes)  # incl. the division by world size
        checked.append(sum(batch_sizes))
    destroy()
    return {"checked": checked}


def test_fused_pooled_all_to_all_equals_torchrec_values_and_gradients_with_fallback():
    results = launch(_fused_pooled_worker, (), nproc=2)
    assert results[0]["checked"] == results[1]["checked"] == [8, 16000]


def test_fused_pooled_checks_what_it_replaces():
    """The opt-in fused pooled all-to-all replaces TorchRec's alltoall_pooled by name: start-up
    refuses a TorchRec whose function is not the one it was written for."""
    import types

    from torchrec.distributed import comm_ops, dist_data

    from deepfm_dist.distributed import pooled_shm

    pooled_shm.check_replaceable(comm_ops, dist_data)  # the pinned TorchRec passes

    def alltoall_pooled(a2a_pooled_embs_tensor, batch_size_per_rank, group=None):
        return None

    alltoall_pooled.__module__ = "torchrec.distributed.comm_ops"
    changed = types.SimpleNamespace(alltoall_pooled=alltoall_pooled)
    with pytest.raises(RuntimeError, match="parameters are .*set sharding.shm_fused_pooled=false"):
        pooled_shm.check_replaceable(changed, types.SimpleNamespace(alltoall_pooled=alltoall_pooled,
                                                                    PooledEmbeddingsAllToAll=dist_data.PooledEmbeddingsAllToAll))

    class Forward:
        def forward(self):
            return 1

    same = types.SimpleNamespace(alltoall_pooled=comm_ops.alltoall_pooled, PooledEmbeddingsAllToAll=Forward)
    with pytest.raises(RuntimeError, match="no longer calls alltoall_pooled"):
        pooled_shm.check_replaceable(comm_ops, same)
