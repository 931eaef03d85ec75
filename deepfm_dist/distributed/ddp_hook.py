"""DDP's gradient all-reduce through shared memory, as a DDP communication hook.

The sharded model, DCP and the sharded tensors keep the stock process group (gloo on CPU, NCCL
on GPU): torch and TorchRec decide devices and code paths by the group's backend name, and a
group of our own breaks them (on a rank holding no shard of a table, a sharded tensor picks CUDA).
What shared memory still speeds up by default is the dense part's gradient all-reduce, through
the extension point DDP offers for it: ``register_comm_hook``, registered by a TorchRec
``DataParallelWrapper`` when DMP wraps the dense part in DDP.

The hook divides each bucket by the world size and sums it over the ranks through this
process's shared segments (``distributed/shm.py``), as DDP's own all-reduce does (divide, then
sum). A bucket larger than the segments goes to the stock group on every rank (the ranks agree
through the segments' headers). DDP reduces buckets in the same order on every rank, which the
segments' operation numbering needs.

(No ``from __future__ import annotations`` here: DDP checks the hook's ``bucket`` annotation
against ``dist.GradBucket`` itself, not a string.)
"""

import itertools
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper

from deepfm_dist.distributed import shm
from deepfm_dist.distributed.env import rendezvous_store

_made = itertools.count()
buckets_reduced = 0
"""Buckets this process reduced through shared memory, over all hooks (for logs and tests)."""


class ShmAllReduceState:
    """The hook's state: this rank's mapped segments and the group for oversized buckets."""

    def __init__(self, segments: shm.SharedSegments, group: dist.ProcessGroup):
        self.segments, self.group = segments, group
        self.world = dist.get_world_size(group)

    @classmethod
    def create(cls, capacity_mb: float, group: dist.ProcessGroup | None = None,
               timeout: timedelta = timedelta(minutes=30)) -> "ShmAllReduceState":
        """Map every rank's segments (collective: every rank of ``group`` calls it, in the same
        order). Check ``shm.room_on_every_rank`` first."""
        group = group or dist.GroupMember.WORLD
        store = rendezvous_store(f"deepfm/ddp_shm_{next(_made)}")
        segments = shm.SharedSegments(store, dist.get_rank(group), dist.get_world_size(group),
                                      int(capacity_mb * 2**20), timeout)
        return cls(segments, group)


def shm_allreduce_hook(state: ShmAllReduceState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the bucket's mean over ranks, through shared memory."""
    tensor = bucket.buffer()
    tensor.div_(state.world)
    if shm.allreduce_sum_(state.segments, tensor):
        global buckets_reduced
        buckets_reduced += 1
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(tensor)
        return fut
    work = dist.all_reduce(tensor, group=state.group, async_op=True)
    return work.get_future().then(lambda f: f.value()[0])


class DeepFMDataParallelWrapper(DefaultDataParallelWrapper):
    """TorchRec's default DDP wrapping of the dense part, plus the shared-memory all-reduce hook
    when ``hook_state`` is given."""

    def __init__(self, hook_state: "ShmAllReduceState | None" = None):
        super().__init__()
        self.hook_state = hook_state

    def wrap(self, dmp, env, device: torch.device) -> None:
        super().wrap(dmp, env, device)
        ddp = dmp._dmp_wrapped_module  # what DataParallelWrapper.wrap is for: DMP's dense wrapper
        if self.hook_state is not None and isinstance(ddp, DistributedDataParallel):
            ddp.register_comm_hook(self.hook_state, shm_allreduce_hook)
