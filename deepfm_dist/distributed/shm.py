"""Shared-memory all-to-all and all-reduce for CPU ranks on one node (``sharding.intra_node_comm``).

On CPU, gloo moves every byte between ranks of one node over loopback TCP, and each collective
passes from the calling thread to a gloo worker thread and its TCP loop thread and back, on the
same core the rank computes on. Here the ranks of one node exchange
through files in /dev/shm that every rank maps: an all-to-all is one copy into this rank's
segment of what the peers need and one copy out of each peer's (this rank's own chunk goes
straight from input to output), an all-reduce one copy in and a sum over the segments (with 2
ranks, the peer's copy added in place), done by the calling thread, with no socket and no
thread hand-off.

By default only DDP's gradient all-reduce uses these segments, through a DDP communication
hook (``distributed/ddp_hook.py``, ``allreduce_sum_``). ``ShmProcessGroup`` (opt-in,
``sharding.shm_all_to_all``) is a ``torch.distributed.ProcessGroup`` (registered as backend
``deepfm_shm``) that serves ``alltoall_base`` (TorchRec's embedding all-to-alls) and
``allreduce`` of one floating-point tensor with SUM (DDP's gradient buckets) from shared memory
and hands every other collective to a gloo group it wraps. An operation larger than the segments
goes to gloo on every rank (the ranks agree through the segments' headers before anyone
proceeds). It is used only for the sharded model's process group (``distributed/sharding.py``).

Protocol (per operation, numbered ``seq`` alike on every rank, since c10d collectives run in
the same order on all ranks): two data buffers per rank, alternating with ``seq``. A rank waits
until every peer has finished reading its buffer of two operations ago, writes its payload and
header, publishes ``ready = seq``, waits for every peer's ``ready``, reads, then publishes
``done = seq``. Waiting spins on the peers' counters (yielding the core) and raises, naming the
rank, when that rank has exited (it flags its exit; a killed one is seen gone from /proc) or
after the group's timeout. x86-64 only (its stores become
visible in program order, which the flag-after-payload protocol relies on); elsewhere the
sharding code keeps gloo.
"""

from __future__ import annotations

import atexit
import os
import platform
import time
import uuid
from datetime import timedelta

import torch
import torch.distributed as dist

BACKEND = "deepfm_shm"
_HEADER_SLOTS = 64
"""int64 slots per buffer header: [0] payload bytes or -1 (too large), [1..W+1] byte offsets."""
_READY, _DONE, _EXITED, _PID = 0, 1, 2, 3
_FLAGS = 4
_SPINS_BEFORE_YIELD = 64
_YIELDS_BEFORE_LIVENESS_CHECK = 256


SHM_DIR = "/dev/shm"
_stats = {"peer_wait_s": 0.0, "segments": 0}


def peer_wait_seconds() -> float:
    """Seconds this process has spent blocked in shared-memory collectives because another rank
    had not arrived yet (or not yet finished reading), over all its groups. Read it before and
    after a stretch of steps: with free communication it would be the ranks' skew alone; it also
    holds the peers' own copy time, which a rank arriving last never waits for."""
    return _stats["peer_wait_s"]


def segments_in_use() -> int:
    """How many sets of shared segments this process mapped (the DDP hook's, the opt-in group's)."""
    return _stats["segments"]


def supported() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and os.path.isdir(SHM_DIR)


def segment_bytes(capacity_bytes: int) -> int:
    """One rank's segment: flags and headers, then two data buffers."""
    header = _FLAGS * 8 + 2 * _HEADER_SLOTS * 8
    return (header + 63) // 64 * 64 + 2 * capacity_bytes


def free_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


class SharedSegments:
    """This rank's mapped segment and every peer's: flags, two headers, two data buffers."""

    def __init__(self, store, rank: int, size: int, capacity_bytes: int, timeout: timedelta):
        if size + 2 > _HEADER_SLOTS:
            raise ValueError(f"sharding.intra_node_comm=shm supports up to {_HEADER_SLOTS - 2} ranks per node, not {size}")
        self.rank, self.size, self.capacity = rank, size, capacity_bytes
        self.timeout_s = timeout.total_seconds()
        _stats["segments"] += 1
        self.seq = 0
        total = segment_bytes(capacity_bytes)
        self.offset = total - 2 * capacity_bytes
        path = os.path.join(SHM_DIR, f"deepfm-{uuid.uuid4().hex}-r{rank}")
        with open(path, "wb") as f:
            # Reserve the pages now: a tmpfs that fills up later would kill the process with
            # SIGBUS on first touch instead of an error here.
            try:
                os.posix_fallocate(f.fileno(), 0, total)
            except OSError as e:
                os.unlink(path)
                raise RuntimeError(f"shared-memory comms: cannot reserve {total / 2**20:.0f} MiB in {SHM_DIR} "
                                   f"({e}); lower sharding.shm_buffer_mb or use sharding.intra_node_comm=gloo") from e
        store.set(f"shm_path_{rank}", path)
        paths = [store.get(f"shm_path_{p}").decode() for p in range(size)]
        for p, peer in enumerate(paths):
            if not os.path.exists(peer):  # ranks that do not share this /dev/shm (separate containers)
                raise RuntimeError(f"shared-memory comms: rank {p}'s segment {peer} is not visible to rank {rank}; "
                                   f"use sharding.intra_node_comm=gloo")
        self.maps = [torch.from_file(p, shared=True, size=total, dtype=torch.uint8) for p in paths]
        start = _FLAGS * 8
        # Flags and headers as numpy views of the same pages: a scalar read or write there is
        # ~0.1 us, against a few us through torch indexing (a step runs ~6 operations, each
        # touching them dozens of times).
        self.flags = [m[:start].view(torch.int64).numpy() for m in self.maps]
        self.headers = [[m[start + i * _HEADER_SLOTS * 8: start + (i + 1) * _HEADER_SLOTS * 8].view(torch.int64).numpy()
                         for i in range(2)] for m in self.maps]
        self.data = [[m[self.offset + i * capacity_bytes: self.offset + (i + 1) * capacity_bytes] for i in range(2)]
                     for m in self.maps]
        self.flags[rank][_PID] = os.getpid()  # before the barrier below: every peer sees it after
        # Every rank has mapped every segment: the files can go (the mappings stay), so a
        # crashed job leaves nothing in /dev/shm.
        store.add("shm_opened", 1)
        deadline = time.monotonic() + self.timeout_s
        while store.add("shm_opened", 0) < size:
            if time.monotonic() > deadline:
                raise RuntimeError("shared-memory comms: not every rank mapped the segments in time")
            time.sleep(0.001)
        os.unlink(path)
        # A rank that leaves (an exception, sys.exit, destroy_process_group) says so, and a
        # waiting peer stops at once instead of spinning until the timeout; a killed one is
        # caught by the liveness check.
        atexit.register(self._mark_exited)

    def _mark_exited(self) -> None:
        if self.flags is not None:
            self.flags[self.rank][_EXITED] = 1

    def release(self) -> None:
        """Say this rank has left, then drop the mappings (the pages go once no rank maps them)."""
        self._mark_exited()
        self.flags = self.headers = self.data = self.maps = None

    def _gone(self, p: int) -> bool:
        """Rank p has left: it said so, or its process no longer runs (killed: a zombie counts)."""
        if int(self.flags[p][_EXITED]):
            return True
        try:
            with open(f"/proc/{int(self.flags[p][_PID])}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except (OSError, IndexError):
            return True

    def _wait(self, flag: int, at_least: int) -> None:
        deadline = started = None
        for p in range(self.size):
            spins = 0
            while int(self.flags[p][flag]) < at_least:
                if started is None:
                    started = time.perf_counter()
                spins += 1
                if int(self.flags[p][_EXITED]):
                    raise RuntimeError(f"shared-memory comms: rank {p} exited before operation {at_least}")
                if spins % _SPINS_BEFORE_YIELD == 0:
                    os.sched_yield()
                    if deadline is None:
                        deadline = time.monotonic() + self.timeout_s
                    elif time.monotonic() > deadline:
                        raise RuntimeError(
                            f"shared-memory comms: rank {p} did not reach operation {at_least} within "
                            f"{self.timeout_s:.0f} s (it may have failed; see its own error)")
                    if spins % (_SPINS_BEFORE_YIELD * _YIELDS_BEFORE_LIVENESS_CHECK) == 0 and self._gone(p):
                        raise RuntimeError(f"shared-memory comms: rank {p} is gone (killed?) before operation "
                                           f"{at_least}")
        if started is not None:
            _stats["peer_wait_s"] += time.perf_counter() - started

    def exchange(self, payload: torch.Tensor | None, offsets: list[int], skip_own: bool = False) -> tuple[bool, int]:
        """Publish ``payload`` (flat uint8, or None when it does not fit) with its per-peer byte
        ``offsets`` (W + 1 of them); wait for every peer. Returns (all fit, buffer parity).

        ``skip_own``: the bytes for this rank itself (``offsets[rank]:offsets[rank + 1]``) are
        not written: no peer reads them, and the caller copies them straight to its output."""
        def write(buf: torch.Tensor) -> None:
            if skip_own:
                own_start, own_end = offsets[self.rank], offsets[self.rank + 1]
                buf[:own_start].copy_(payload[:own_start])
                buf[own_end: payload.numel()].copy_(payload[own_end:])
            else:
                buf[: payload.numel()].copy_(payload)

        return self.exchange_written(None if payload is None else write, offsets,
                                     0 if payload is None else payload.numel())

    def exchange_written(self, write, offsets: list[int], nbytes: int) -> tuple[bool, int]:
        """``exchange`` where ``write(buf)`` fills this rank's buffer (flat uint8) with the
        ``nbytes`` it publishes, in place; ``write`` is None, or ``nbytes`` is over the capacity,
        when the payload does not fit. Lets a caller gather strided data straight into shared
        memory."""
        self.seq += 1
        parity = self.seq % 2
        self._wait(_DONE, self.seq - 2)  # everyone is done reading what we wrote two ops ago
        header = self.headers[self.rank][parity]
        if write is None or nbytes > self.capacity:
            header[0] = -1
        else:
            write(self.data[self.rank][parity])
            header[0] = nbytes
            header[1: 2 + self.size] = offsets
        self.flags[self.rank][_READY] = self.seq
        self._wait(_READY, self.seq)
        return all(int(self.headers[p][parity][0]) >= 0 for p in range(self.size)), parity

    def finish(self) -> None:
        self.flags[self.rank][_DONE] = self.seq

    def received_range(self, p: int, parity: int, expected_bytes: int) -> tuple[int, int]:
        """After ``exchange``: where rank p's bytes for this rank lie in p's buffer
        ``data[p][parity]`` (``[start, end)``, from p's header). Raises, naming both ranks,
        when p sends another amount than this rank expects (finishing the operation first,
        so no peer waits on it)."""
        start, end = int(self.headers[p][parity][1 + self.rank]), int(self.headers[p][parity][2 + self.rank])
        if end - start != expected_bytes:
            self.finish()
            raise RuntimeError(f"all_to_all: rank {p} sends {end - start} bytes to rank {self.rank}, "
                               f"which expects {expected_bytes}")
        return start, end


def allreduce_sum_(seg: SharedSegments, tensor: torch.Tensor) -> bool:
    """Sum ``tensor`` over the ranks of ``seg`` in place through shared memory. Returns False,
    leaving ``tensor`` unchanged, when it cannot go this way: not a contiguous floating-point CPU
    tensor (decided locally: every rank passes the same kind of tensor), or larger than some rank's
    buffer (agreed by all ranks through the headers). The caller then uses another transport."""
    if not tensor.is_floating_point() or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return False
    nbytes = tensor.numel() * tensor.element_size()
    fits = nbytes <= seg.capacity
    all_fit, parity = seg.exchange(_flat_bytes(tensor) if fits else None, [0] * (seg.size + 1))
    if not all_fit:
        seg.finish()
        return False
    views = [seg.data[p][parity][:nbytes].view(tensor.dtype).view(tensor.shape) for p in range(seg.size)]
    if seg.size == 2:
        # a + b == b + a exactly in IEEE arithmetic: each rank adds the other's copy to its
        # own tensor, and both get bitwise the same sum with one pass fewer.
        tensor.add_(views[1 - seg.rank])
    else:
        # The same order on every rank, so every replica gets bitwise the same sum.
        tensor.copy_(views[0])
        for v in views[1:]:
            tensor.add_(v)
    seg.finish()
    return True


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def _completed(tensors: list[torch.Tensor]):
    fut = torch.futures.Future()
    fut.set_result(tensors)
    return torch._C._distributed_c10d._create_work_from_future(fut)


class ShmProcessGroup(dist.ProcessGroup):
    """All-to-all and SUM all-reduce through shared memory; everything else through ``inner``
    (a gloo backend of the same ranks)."""

    def __init__(self, inner, segments: SharedSegments, name: str = ""):
        super().__init__(inner.rank(), inner.size())
        self.inner, self.segments, self._name = inner, segments, name

    @property
    def group_name(self) -> str:
        # c10d keeps a group's name in its backends, and this group has none of its own.
        return self._name

    def getBackendName(self) -> str:  # noqa: N802 (c10d's name)
        return BACKEND

    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts):
        seg, world = self.segments, self.size()
        in_rows = list(input_split_sizes) or [input.shape[0] // world] * world
        out_rows = list(output_split_sizes) or [output.shape[0] // world] * world
        in_row_bytes = input[0].numel() * input.element_size() if input.shape[0] else 0
        out_row_bytes = output[0].numel() * output.element_size() if output.shape[0] else 0
        offsets = [0]
        for rows in in_rows:
            offsets.append(offsets[-1] + rows * in_row_bytes)
        fits = offsets[-1] <= seg.capacity and input.device.type == "cpu"
        payload = _flat_bytes(input) if fits else None
        # This rank's own chunk never goes through shared memory: copied input -> output below
        # (one copy instead of two; with 2 ranks it is half of every all-to-all).
        all_fit, parity = seg.exchange(payload, offsets, skip_own=True)
        if not all_fit:
            seg.finish()
            return self.inner.alltoall_base(output, input, output_split_sizes, input_split_sizes, opts)
        out = _flat_bytes(output) if output.is_contiguous() else torch.empty(output.numel() * output.element_size(),
                                                                              dtype=torch.uint8)
        pos = 0
        for p in range(world):
            start, end = seg.received_range(p, parity, out_rows[p] * out_row_bytes)
            source = payload if p == self.rank() else seg.data[p][parity]
            out[pos: pos + end - start].copy_(source[start:end])
            pos += end - start
        seg.finish()
        if not output.is_contiguous():
            output.copy_(out.view(output.dtype).view(output.shape))
        return _completed([output])

    def allreduce(self, tensors, opts):
        tensor = tensors[0] if len(tensors) == 1 else None
        if tensor is None or opts.reduceOp != dist.ReduceOp.SUM or not allreduce_sum_(self.segments, tensor):
            return self.inner.allreduce(tensors, opts)
        return _completed(tensors)

    def shutdown(self) -> None:
        """``destroy_process_group``: this rank takes part in no further operation; say so and
        unmap (a process that shards models repeatedly does not accumulate segments)."""
        self.segments.release()
        if _by_name.get(self._name) is self:
            del _by_name[self._name]
        self.inner.shutdown()

    def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes, opts):
        return self.alltoall_base(output, input, output_split_sizes, input_split_sizes, opts)



def _delegate(name: str, inner_name: str):
    def method(self, *args, **kwargs):
        return getattr(self.inner, inner_name)(*args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"The wrapped gloo backend's ``{inner_name}``."
    return method


# Everything else: the wrapped gloo backend (torch 2.13 names a few ProcessGroup methods
# differently from the Backend's: the *_single ones are the Backend's _*_base).
for _name, _inner in [
    ("allgather", "allgather"), ("_allgather_base", "_allgather_base"), ("all_gather_single", "_allgather_base"),
    ("allgather_coalesced", "allgather_coalesced"), ("allreduce_coalesced", "allreduce_coalesced"),
    ("alltoall", "alltoall"), ("barrier", "barrier"), ("monitored_barrier", "monitored_barrier"),
    ("broadcast", "broadcast"), ("gather", "gather"), ("scatter", "scatter"), ("reduce", "reduce"),
    ("reduce_scatter", "reduce_scatter"), ("_reduce_scatter_base", "_reduce_scatter_base"),
    ("reduce_scatter_single", "_reduce_scatter_base"), ("send", "send"), ("recv", "recv"),
    ("recv_anysource", "recv_anysource"),
]:
    setattr(ShmProcessGroup, _name, _delegate(_name, _inner))


_capacity_bytes = 64 * 2**20
"""Buffer size of the groups this process makes (``new_shm_group`` sets it; TorchRec may make
further groups with this backend, e.g. intra-node subgroups, which get the same size)."""
groups_created = 0
"""How many shared-memory groups this process made (for logs and tests)."""


def _create(opts, _backend_options) -> ShmProcessGroup:
    """c10d's creator for this backend (extended API: it gets the group's name, which
    ``destroy_process_group(group)`` needs): a gloo backend for the collectives shared memory
    does not serve, and this group's segments, both set up through the group's own store."""
    store, rank, size, timeout = opts.store, opts.group_rank, opts.group_size, opts.timeout
    inner = dist.ProcessGroupGloo(dist.PrefixStore("gloo", store), rank, size, timeout)
    segments = SharedSegments(dist.PrefixStore("shm", store), rank, size, _capacity_bytes, timeout)
    group = ShmProcessGroup(inner, segments, name=opts.group_id)
    _by_name[opts.group_id] = group
    return group


_by_name: dict[str, ShmProcessGroup] = {}
"""This process's live shared-memory backends by group name (``backend_of``)."""


def backend_of(group) -> ShmProcessGroup | None:
    """The shared-memory backend behind a c10d group, or None when it has none (gloo, NCCL,
    None, or a group already destroyed)."""
    try:
        name = group.group_name
    except (AttributeError, RuntimeError):
        return None
    backend = _by_name.get(name)
    return backend if backend is not None and backend.segments.flags is not None else None


def room_on_every_rank(capacity_mb: float, local_world_size: int) -> tuple[bool, str]:
    """Whether /dev/shm on every rank's node holds the segments of all its local ranks (a
    collective on the default group, so the ranks agree); and a line saying what was found."""
    need = segment_bytes(int(capacity_mb * 2**20)) * local_world_size
    have = free_bytes()
    ok = torch.tensor([1 if have >= need else 0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item()), f"{SHM_DIR} has {have / 2**20:,.0f} MiB free here, the segments need {need / 2**20:,.0f} MiB"


def new_shm_group(capacity_mb: float, timeout: timedelta = timedelta(minutes=30)) -> dist.ProcessGroup:
    """A group of every rank whose all-to-alls and SUM all-reduces go through shared memory
    (collective: every rank calls it, in the same order as its other new_group calls). Check
    ``room_on_every_rank`` first."""
    global _capacity_bytes, groups_created
    if BACKEND not in dist.Backend.backend_list:
        dist.Backend.register_backend(BACKEND, _create, extended_api=True, devices=["cpu"])
    _capacity_bytes = int(capacity_mb * 2**20)
    group = dist.new_group(backend=BACKEND, timeout=timeout)
    groups_created += 1
    return group
