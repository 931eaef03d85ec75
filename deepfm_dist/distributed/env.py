"""Process group and device selection: one code path, the device chosen at start-up."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0 talks (logs, files); every rank computes."""
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(requested: str, local_rank: int) -> torch.device:
    """``auto``: CUDA (one GPU per local rank) when visible, else CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device='cuda' but no CUDA device is visible")
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise RuntimeError(f"local rank {local_rank} has no GPU: {n} visible; start at most {n} ranks per node")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, with keys private to this restart attempt.

    After ``torchrun --max-restarts`` restarts the workers, torch 2.13's default ``env://``
    init lets gloo read the previous attempt's peer addresses from the agent's store, and the
    restarted ranks fail with "connectFullMesh failed ... Connection refused" (reproduced with
    a 10-line script). Prefixing the keys with the restart count keeps attempts apart.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=not agent_store and rank == 0,  # under torchrun the agent hosts the store
        timeout=timeout,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"deepfm/attempt_{attempt}", store)


_store: dist.Store | None = None
"""The rendezvous store of this attempt's default group (``init_distributed``)."""


def rendezvous_store(prefix: str) -> dist.Store:
    """A namespace of the default group's rendezvous store, for side channels every rank sets up
    together (the shared-memory segments of the gradient all-reduce)."""
    if _store is None:
        raise RuntimeError("rendezvous_store: the default process group was not made by init_distributed")
    return dist.PrefixStore(prefix, _store)


def init_distributed(requested_device: str, timeout_s: float = 1800) -> DistEnv:
    """Join (or create) the default process group: NCCL for CUDA, gloo for CPU.

    Under torchrun the rank and world come from the environment; a plain ``python -m`` run
    becomes a world of one on a free local port, so the same code path runs everywhere.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    device = pick_device(requested_device, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        global _store
        timeout = datetime.timedelta(seconds=timeout_s)
        _store = _attempt_store(rank, world_size, timeout)
        dist.init_process_group(
            backend=backend,
            store=_store,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    return DistEnv(rank, world_size, local_rank, local_world_size, device, backend)


def set_cpu_threads(requested: int, local_world_size: int) -> int:
    """Intra-op threads per rank: ranks x threads must not exceed the cores (oversubscription
    more than halves throughput on CPU)."""
    threads = requested or max(1, len(os.sched_getaffinity(0)) // max(1, local_world_size))
    torch.set_num_threads(threads)
    return threads


_UNPINNED: set[int] | None = None  # the cores this process could use before pin_cpu_cores


def unpin_cpu_cores() -> None:
    """Give a forked helper process (a loader worker) back every core the rank had before it
    was pinned: workers exist to use spare cores, not to compete with their rank's own."""
    if _UNPINNED:
        os.sched_setaffinity(0, _UNPINNED)


def pin_cpu_cores(local_rank: int, local_world_size: int, threads: int) -> list[int]:
    """Pin this rank (every thread it has, and so every thread it will create) to its own cores:
    local rank r with t threads gets the r-th t of the cores this process may use. Returns the
    cores, or [] (nothing pinned) when the ranks' threads would not fit on separate cores.

    Why: a CPU rank also runs gloo's threads and the loader; left free to migrate, they run on
    the other rank's core and delay it, and then both wait in the next collective.
    """
    global _UNPINNED
    cores = sorted(os.sched_getaffinity(0))
    if local_world_size * threads > len(cores):
        return []
    _UNPINNED = set(cores)
    mine = set(cores[local_rank * threads : (local_rank + 1) * threads])
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), mine)
        except OSError:
            pass  # a thread that has just ended
    return sorted(mine)


def setup_cpu_rank(env: DistEnv, requested_threads: int, pin: bool) -> tuple[int | None, list[int]]:
    """A CPU rank's intra-op threads (``set_cpu_threads``) and, with ``pin``, its own cores
    (``pin_cpu_cores``); returns (threads, pinned cores), or (None, []) on a GPU rank."""
    if env.device.type != "cpu":
        return None, []
    threads = set_cpu_threads(requested_threads, env.local_world_size)
    return threads, (pin_cpu_cores(env.local_rank, env.local_world_size, threads) if pin else [])


def broadcast_result(env: DistEnv, value: object) -> object:
    """Send rank 0's picklable ``value`` (or the exception it raised) to every rank."""
    if env.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
