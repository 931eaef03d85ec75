"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): sharded, resumable, reshardable.

Layout of ``<checkpoint.dir>``::

    step_000000120/          a complete checkpoint (renamed into place when every rank wrote)
        __0_0.distcp ...     DCP shards: model (tables, dense), fused + dense optimizer state,
                             per-rank RNG states
        .metadata            DCP's index
        meta.json            step, epoch, world size, plan, per-rank loader positions, config
    step_000000150.tmp/      being written (or left by a crash): never loaded, removed later

Only tensors go through DCP (optimizer ``param_groups`` are rebuilt from the config and the LR
schedule), the rest is JSON. DCP's own reader unpickles ``.metadata`` with ``pickle.load``, so a
crafted checkpoint could run code: every load here goes through ``dcp_load``, whose reader
admits only the classes DCP's metadata consists of and whose planner reads byte items with
``weights_only=True`` (``UnsafeCheckpointError`` otherwise, naming the file). DCP stores each shard with
its global offsets, so a checkpoint written by N ranks with one plan loads into M ranks with
another (table-wise -> row-wise, 2 ranks -> 1).
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from deepfm_dist.model import TABLE_WEIGHT_KEY

_COMPLETE = re.compile(r"^step_(\d{9})$")
META = "meta.json"


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:09d}")


def list_complete(root: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _COMPLETE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, META)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest(root: str) -> str | None:
    found = list_complete(root)
    return found[-1][1] if found else None


BEST = "best.json"
"""In a checkpoint folder: which checkpoint is best by ``checkpoint.best_metric`` (Checkpointer)."""


def _check_keys(path: str, obj: Any, keys: dict[str, tuple[type, ...]]) -> dict:
    """``obj`` (a file's JSON) as a dict holding ``keys`` of their types; else CheckpointError
    naming the file and the key. Written by us and read back: a wrong one was edited or damaged."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    for key, types in keys.items():
        if key not in obj:
            raise CheckpointError(f"{path}: key {key!r} is missing")
        value = obj[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise CheckpointError(f"{path}: key {key!r}: expected {names}, found {value!r}")
    return obj


_BEST_KEYS = {"checkpoint": (str,), "step": (int, type(None)), "metric": (str,), "value": (int, float, type(None)),
              "evals_since": (int,)}
_META_KEYS = {"step": (int,), "epoch": (int,), "step_in_epoch": (int,), "world_size": (int,),
              "loader_states": (list,), "config": (dict,)}


def read_best(root: str) -> dict | None:
    """``root``'s best.json, if it names a complete checkpoint there (None without one). A
    damaged or edited file is refused naming the key, and it can only name a folder in ``root``."""
    file = os.path.join(root, BEST)
    try:
        with open(file) as f:
            best = json.load(f)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    _check_keys(file, best, _BEST_KEYS)
    name = best["checkpoint"]
    if name and (os.path.basename(name) != name or name in (".", "..")):
        raise CheckpointError(f"{file}: key 'checkpoint': {name!r} is not the name of a checkpoint folder in {root}")
    return best if name and os.path.isfile(os.path.join(root, name, META)) else None


def resolve(path: str) -> str:
    """A checkpoint directory as it is; a folder of checkpoints: its best one (best.json), else
    its latest complete one. Raises FileNotFoundError naming ``path``."""
    if os.path.isfile(os.path.join(path, META)):
        return path
    best = read_best(path)
    if best is not None:
        return os.path.join(path, best["checkpoint"])
    found = latest(path)
    if found is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint (no {META}) nor a folder holding complete ones")
    return found


def read_meta(path: str) -> dict[str, Any]:
    """The checkpoint's meta.json, its keys checked (CheckpointError naming the key)."""
    meta_path = os.path.join(path, META)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is not a complete checkpoint: {META} is missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e})") from None
    _check_keys(meta_path, meta, _META_KEYS)
    if meta["world_size"] < 1 or len(meta["loader_states"]) != meta["world_size"]:
        raise CheckpointError(f"{meta_path}: key 'loader_states': expected one entry per rank of world_size "
                              f"{meta['world_size']}, found {len(meta['loader_states'])}")
    return meta


class UnsafeCheckpointError(ValueError):
    """A checkpoint file asks to build something a checkpoint cannot hold (code, not data)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message is one line naming the checkpoint,
    the file where one is known, and what is wrong. (torch's ``CheckpointException`` derives from
    ``BaseException`` and prints every rank's traceback, so callers' ``except Exception`` missed it.)"""


def _first_failure(e: CheckpointException) -> str:
    """One line from DCP's per-rank failures: the first rank's exception type and first sentence."""
    for rank, failure in sorted(e.failures.items()):
        exc = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(exc, BaseException):
            cause = exc
            while cause is not None and not isinstance(cause, OSError):  # the OS's reason says most
                cause = cause.__cause__ or cause.__context__
            exc = cause or exc
            text = " ".join(str(exc).split())
            first = re.split(r"(?<=\.) ", text, maxsplit=1)[0]
            return f"rank {rank}: {type(exc).__name__}: {first}"
    return " ".join(str(e).split())[:300]


def check_storage(path: str, metadata: Metadata) -> None:
    """Every data file the index names is there and long enough for the items it holds:
    a deleted or truncated shard is named before DCP reads anything."""
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = str(getattr(info, "relative_path", ""))
        if rel:
            needed[rel] = max(needed.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(needed.items()):
        file = os.path.join(path, rel)
        try:
            have = os.path.getsize(file)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path}: data file {rel} is missing (the index names it)") from None
        if have < size:
            raise CheckpointError(f"checkpoint {path}: data file {rel} is truncated: {have:,} bytes, the index "
                                  f"needs {size:,}")


# What DCP's .metadata is made of (torch 2.13): its dataclasses and enums, the file reader's
# storage records, tensor sizes, dtypes and layouts, and paths. Nothing here runs code when built.
_METADATA_MODULES = {"torch.distributed.checkpoint.metadata"}
_METADATA_NAMES = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if module in _METADATA_MODULES and not name.startswith("__"):
            obj = super().find_class(module, name)
            if isinstance(obj, type):  # the module's classes and enums, not its functions
                return obj
        elif (module, name) in _METADATA_NAMES:
            return super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.path}: refused: it asks to load {module}.{name}, which is no part of a checkpoint's "
            f"metadata (a crafted file can run code this way). Load only checkpoints from a source you trust."
        )


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with ``.metadata`` read by an unpickler that admits only DCP's metadata
    classes (``StorageReader.read_metadata`` is DCP's extension point for this). ``metadata``:
    the index already read that way, served instead of reading the file again."""

    def __init__(self, path: str, metadata: Metadata | None = None):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        if rank is None and self._metadata is not None:
            metadata = self._metadata
        else:
            metadata = self._unpickle(os.path.join(str(self.path), ".metadata" if rank is None else f"__{rank}.metadata"))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    @staticmethod
    def _unpickle(path: str) -> Metadata:
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f, path).load()
        except UnsafeCheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a readable checkpoint index ({type(e).__name__}: {e})") from None
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP's Metadata")
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, with byte items (non-tensor values) admitted only if they load
    with ``torch.load(weights_only=True)`` (tensors, containers, numbers and strings)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f"it asks to load {found.group(1)}" if found else str(e).split("\n")[0]
            raise UnsafeCheckpointError(
                f"{self.path}: refused: item {read_item.dest_index.fqn!r} is not plain data ({what}). "
                f"Load only checkpoints from a source you trust."
            ) from None
        value.seek(0)
        super().load_bytes(read_item, value)


def read_dcp_metadata(path: str) -> Metadata:
    """The checkpoint's DCP index, read as ``dcp_load`` reads it: raises ``UnsafeCheckpointError``
    (a ValueError naming the file) for one that would build anything but DCP's metadata. Lets a
    tool check a checkpoint before it creates output or joins a process group."""
    return SafeFileSystemReader(path).read_metadata()


def dcp_load(payload: dict[str, Any], path: str, metadata: Metadata | None = None) -> None:
    """``dcp.load`` of ``path`` into ``payload`` in place, unpickling only data (see the module
    docstring). ``metadata``: the index if the caller has read it (``read_dcp_metadata``).
    Collective when a process group is initialised."""
    # Read before DCP does: our error names the file, DCP would wrap it in an AssertionError.
    if metadata is None:
        metadata = read_dcp_metadata(path)
    check_storage(path, metadata)
    try:
        dcp.load(payload, storage_reader=SafeFileSystemReader(path, metadata), planner=SafeLoadPlanner(path))
    except CheckpointException as e:  # DCP gathers each rank's exception: ours, if any, says it best
        failures = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]  # (exception, trace)
        unsafe = [f for f in failures if isinstance(f, UnsafeCheckpointError)]
        if unsafe:
            raise unsafe[0] from None
        raise CheckpointError(f"checkpoint {path}: cannot be loaded: {_first_failure(e)}") from None


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class ExactStorageSavePlanner(DefaultSavePlanner):
    """DCP's default planner, handing the file writer each contiguous CPU tensor over exactly its
    own bytes.

    ``torch.save`` of a view writes the view's whole storage, so DCP's file writer clones every
    tensor whose storage is larger than the tensor, and keeps the clones until the rank's file is
    written. The fused embedding kernels hold a rank's tables (and their optimizer state) in one
    flat buffer, every table a view into it: each save made a second copy of all of a rank's
    tables, the largest memory peak of a run. A tensor built by ``torch.from_numpy`` over the
    view's bytes aliases them (no copy) and owns a storage of exactly its size, so nothing is
    cloned and the bytes written are the same.
    """

    def resolve_data(self, write_item: Any) -> Any:
        data = super().resolve_data(write_item)
        if (isinstance(data, torch.Tensor) and data.device.type == "cpu" and data.is_contiguous()
                and not data.requires_grad and data.untyped_storage().nbytes() != data.nbytes and data.numel() > 0):
            return _exact_alias(data)
        return data


def _exact_alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor over ``t``'s bytes only (same shape and dtype, shares memory with ``t``)."""
    flat = t.detach().reshape(-1)
    # numpy has no bfloat16/float16 of torch's kind: go through same-width integers.
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    alias = torch.from_numpy(flat.view(as_int).numpy())
    return alias.view(t.dtype).view(t.shape)


@dataclass
class TrainState:
    """What a resumed run needs beyond the tensors."""

    step: int
    epoch: int
    step_in_epoch: int
    loader_states: list[Any]
    """One entry per rank: that rank's training-loader position after ``step_in_epoch`` steps."""


def _rank_key(rank: int) -> str:
    return f"rng/rank{rank}"


def save(
    root: str,
    *,
    model: torch.nn.Module,
    optimizer: Any,
    state: TrainState,
    extra_meta: dict[str, Any],
    keep: int,
    protect: str | None = None,
) -> str:
    """Write a checkpoint of every rank's shards; returns its final path. Collective.

    Rank 0 renames ``step_N.tmp`` to ``step_N`` only after every rank has finished writing, so a
    crash at any point leaves no directory that looks complete. Then it deletes all but the last
    ``keep`` complete checkpoints and any stale ``.tmp`` directory.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    final = step_dir(root, state.step)
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        # Per-rank keys: every rank's RNG stream differs, and DCP would de-duplicate a key
        # that all ranks share.
        _rank_key(rank): rng_state(),
    }
    try:
        dcp.save(payload, checkpoint_id=tmp, planner=ExactStorageSavePlanner())
    except CheckpointException as e:  # e.g. a full disk on one rank: DCP reports it on every rank
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a half-written step_N.tmp would only take space
        raise CheckpointError(f"checkpoint {final}: saving failed, nothing kept: {_first_failure(e)}") from None
    if rank == 0:
        meta = {
            "step": state.step,
            "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch,
            "world_size": world,
            "loader_states": state.loader_states,
            **extra_meta,
        }
        try:
            with open(os.path.join(tmp, META), "w") as f:
                json.dump(meta, f, indent=1, default=str)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"checkpoint {final}: saving failed, nothing kept: writing {META}: {e}") from None
        if os.path.exists(final):  # the same step saved twice (e.g. at the end after every_steps)
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(root, keep, protect)
    if dist.is_initialized():
        dist.barrier()
    return final


def prune(root: str, keep: int, protect: str | None = None) -> None:
    """Keep the newest ``keep`` complete checkpoints (and ``protect``, the best one); remove
    older ones and stale temporaries."""
    complete = list_complete(root)
    for _, path in complete[: max(0, len(complete) - keep)]:
        if protect is None or os.path.abspath(path) != os.path.abspath(protect):
            shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(root):
        if name.endswith(".tmp") and _COMPLETE.match(name[: -len(".tmp")]):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _on_default_group(state: Any) -> Any:
    """``state`` with every ShardedTensor that lives on another process group re-created on the
    default group, over the same local shard tensors (loading into it writes the model's).

    Only the opt-in ``sharding.shm_all_to_all`` makes such tensors: torch's sharded tensors ask
    their group's backend name to learn the device of a rank that holds no shard, and answer
    CUDA for a name they do not know. On the default path every sharded tensor is already on the
    default group and ``state`` comes back as it is."""
    if isinstance(state, dict):
        return {k: _on_default_group(v) for k, v in state.items()}
    if isinstance(state, ShardedTensor) and state._process_group is not dist.group.WORLD:
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            state.local_shards(), state.metadata(), process_group=dist.group.WORLD)
    return state


def _saved_rng(metadata: Metadata, rank: int) -> dict[str, torch.Tensor]:
    """This process's RNG states that the checkpoint (its DCP index) also holds for ``rank``: a
    CPU run saves no CUDA state, and DCP refuses to load a key the checkpoint lacks."""
    saved = metadata.state_dict_metadata
    return {k: v for k, v in rng_state().items() if f"{_rank_key(rank)}.{k}" in saved}


def load(path: str, *, model: torch.nn.Module, optimizer: Any | None, rng: bool = True,
         index: Metadata | None = None) -> dict[str, Any]:
    """Load a checkpoint into the (already sharded) model and optimizer, in place. Collective.

    Works across world sizes and sharding plans: DCP reads, for each local shard, the parts of
    the saved shards that overlap it. RNG states (``rng``; prediction needs none) are restored
    only when the world size matches (a different world has different streams anyway), and only
    those the checkpoint holds (a CPU-written checkpoint resumed on a GPU has no CUDA state).
    ``index``: the DCP index if the caller has read it (``read_dcp_metadata``). Returns the
    checkpoint's meta.json.
    """
    meta = read_meta(path)
    if index is None:
        index = read_dcp_metadata(path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    payload: dict[str, Any] = {"model": _on_default_group(model.state_dict())}
    if optimizer is not None:
        payload["optimizer"] = _on_default_group(optimizer.state_dict())
    restore_rng = rng and meta.get("world_size") == world
    if restore_rng:
        payload[_rank_key(rank)] = _saved_rng(index, rank)
    dcp_load(payload, path, index)
    model.load_state_dict(payload["model"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if restore_rng:
        set_rng_state(payload[_rank_key(rank)])
    return meta


# --------------------------------------------------------------------------- the loop's checkpointer


class TrackedIterator:
    """Iterates a loader and remembers its position after each batch it handed out.

    The pipeline pulls batches ahead of the step it trains, so the loader's current position
    is not the checkpoint's: ``position(k)`` is the loader state after exactly k batches of
    this epoch (k = steps trained), which a resumed run continues from.
    """

    def __init__(self, loader, start: int):
        self._it = iter(loader)
        self._loader = loader
        self._states = {start: loader.state_dict()}
        self._count = start

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._it)
        self._count += 1
        self._states[self._count] = self._loader.state_dict()
        for k in [k for k in self._states if k < self._count - 8]:
            del self._states[k]
        return batch

    def position(self, trained: int):
        return self._states[trained]


def _global_shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, (ShardedTensor, torch.Tensor)):
        return tuple(value.size())
    return None


def check_same_model(path: str, model: torch.nn.Module, index: Metadata) -> None:
    """Refuse a checkpoint whose tensors (tables first) lack or differ in shape from this model's,
    naming them: a warm start must not load weights into another layout."""
    saved = index.state_dict_metadata
    tables, others = [], []
    for key, value in model.state_dict().items():
        shape = _global_shape(value)
        if shape is None:
            continue
        meta = saved.get(f"model.{key}")
        got = tuple(meta.size) if meta is not None and hasattr(meta, "size") else None
        if got != shape:
            m = TABLE_WEIGHT_KEY.search(key)
            what = (f"{m.group(1)}: " if m else f"{key}: ") + (
                f"{'x'.join(map(str, got))} in the checkpoint" if got else "not in the checkpoint") + \
                f", {'x'.join(map(str, shape))} here"
            (tables if m else others).append(what)
    if tables or others:
        raise ValueError(
            f"--init_from {path}: the checkpoint's model differs from this config's; "
            + ("tables (rows x width): " + "; ".join(tables) if tables else "")
            + ("; " if tables and others else "") + ("; ".join(others[:5]) if others else "")
        )


class Checkpointer:
    """When to save (``checkpoint.every_steps``, ``every_minutes``, at the end, on a stop, at an
    evaluation that improves ``checkpoint.best_metric``) and what: the sharded model, both
    optimizers, RNG states, every rank's loader position, the plan and the config. Also resumes
    and warm-starts. Collective: every rank calls ``save``, ``resume`` and ``track_best``."""

    def __init__(self, cfg, env, model: torch.nn.Module, optimizers, plan_report, log):
        """``plan_report``: rank 0's ``planning.PlanReport`` (meta.json's \"plan\", as in plan.json); None elsewhere."""
        self.cfg, self.env, self.model, self.opts, self.log = cfg, env, model, optimizers, log
        self.plan = plan_report.to_json() if plan_report is not None else None
        self.every_steps, self.minutes = cfg.checkpoint.every_steps, cfg.checkpoint.every_minutes
        self.last_save_time = time.monotonic()
        self.last_saved_step: int | None = None
        self.best: dict | None = None
        """best.json: checkpoint (folder name), step, metric, value, evals_since (evaluations
        since the best, for ``train.early_stop_patience``)."""

    def due(self, step: int) -> bool:
        return bool(self.every_steps) and step % self.every_steps == 0

    def timed_due(self) -> bool:
        """This rank's clock says a timed checkpoint is due (the ranks agree at the sync point)."""
        return self.minutes > 0 and time.monotonic() - self.last_save_time >= self.minutes * 60

    def resume(self, steps_per_epoch: int) -> tuple[TrainState, Any]:
        """(where the run continues, this rank's loader state or None): the latest complete
        checkpoint under ``--resume``, else the start."""
        start = TrainState(step=0, epoch=0, step_in_epoch=0, loader_states=[])
        path = latest(self.cfg.checkpoint_dir) if self.cfg.resume else None
        if path is None:
            if self.env.is_main and os.path.exists(os.path.join(self.cfg.checkpoint_dir, BEST)):
                os.remove(os.path.join(self.cfg.checkpoint_dir, BEST))  # an earlier run's: this run's best comes
            if self.cfg.resume:
                self.log(f"resume: no complete checkpoint in {self.cfg.checkpoint_dir}; starting "
                         + ("from --init_from" if self.cfg.init_from else "fresh"))
            if self.cfg.init_from:
                self.warm_start()
            return start, None
        self.best = read_best(self.cfg.checkpoint_dir)
        # The dense optimizer's state is created lazily; make it so DCP can load into it.
        self.opts.dense.init_state()
        meta = load(path, model=self.model, optimizer=self.opts.combined)
        # FBGEMM keeps the fused optimizers' step (Adam's bias correction) in its own buffer,
        # outside the state DCP saves: restore it, or it restarts at 1 after every resume.
        self.opts.fused.set_optimizer_step(meta["step"])
        step_in_epoch, epoch, loader_state = meta["step_in_epoch"], meta["epoch"], None
        if meta["world_size"] == self.env.world_size:
            loader_state = meta["loader_states"][self.env.rank]
        elif step_in_epoch:
            # Another world size splits the rows differently: the interrupted epoch restarts
            # (its rows are seen again) rather than skipping rows nobody trained on.
            self.log(f"resume: checkpoint written by {meta['world_size']} ranks, now {self.env.world_size}: "
                     f"epoch {epoch + 1} restarts from its first batch")
            step_in_epoch = 0
        if step_in_epoch >= steps_per_epoch:
            epoch, step_in_epoch, loader_state = epoch + 1, 0, None
        self.log(f"resumed from {path} (step {meta['step']}, epoch {epoch + 1}, batch {step_in_epoch})")
        return TrainState(meta["step"], epoch, step_in_epoch, []), loader_state

    def warm_start(self) -> None:
        """``--init_from``: this run starts (step 0) from another checkpoint's model weights and,
        with ``init_optimizer``, its optimizer state; resharded to this run's plan."""
        try:
            path = resolve(self.cfg.init_from)
        except FileNotFoundError as e:
            raise ValueError(f"--init_from: {e}") from None
        index = read_dcp_metadata(path)
        check_same_model(path, self.model, index)
        optimizer = None
        if self.cfg.init_optimizer:
            self.opts.dense.init_state()
            optimizer = self.opts.combined
        meta = load(path, model=self.model, optimizer=optimizer, rng=False, index=index)
        self.log(f"init_from: model weights{' and optimizer state' if optimizer is not None else ''} of {path} "
                 f"(step {meta['step']}); this run starts at step 0")

    def track_best(self, record: dict, state: TrainState, position) -> bool:
        """After an evaluation: save a checkpoint when ``record`` improves the best metric, and
        say whether ``train.early_stop_patience`` evaluations in a row did not. ``position()``:
        this rank's loader state. Collective (the record is the same on every rank)."""
        metric = self.cfg.checkpoint.best_metric
        if metric == "none":
            return False
        value = record[f"val_{metric}"]
        best = self.best["value"] if self.best else None
        improved = not math.isnan(value) and (best is None or (value > best if metric == "auc" else value < best))
        if improved:
            path = self.save(state, position(), best_step=True)
            self.best = {"checkpoint": os.path.basename(path), "step": state.step, "metric": metric, "value": value,
                         "evals_since": 0}
        else:  # no best yet (a first evaluation without a value) counts as one without improving
            self.best = self.best or {"checkpoint": "", "step": None, "metric": metric, "value": None, "evals_since": 0}
            self.best["evals_since"] += 1
        if self.env.is_main:
            from deepfm_dist.fsutil import write_json_atomic

            write_json_atomic(os.path.join(self.cfg.checkpoint_dir, BEST), self.best)
        patience = self.cfg.train.early_stop_patience
        return bool(patience) and self.best["evals_since"] >= patience

    def save(self, state: TrainState, position: Any, best_step: bool = False) -> str:
        """Write a checkpoint of ``state``; ``position`` is this rank's loader state after
        ``state.step_in_epoch`` batches."""
        from deepfm_dist.evaluator import sync_dense_buffers

        states: list = [position]
        if self.env.world_size > 1:
            states = [None] * self.env.world_size
            dist.all_gather_object(states, position)
        state.loader_states = states
        # DCP stores one copy of a replicated tensor, from whichever rank it picks; make the
        # BatchNorm statistics rank 0's (the ones DDP broadcasts at the next step) everywhere.
        sync_dense_buffers(self.model, self.env)
        protect = os.path.join(self.cfg.checkpoint_dir, self.best["checkpoint"]) if self.best and self.best["checkpoint"] else None
        path = save(self.cfg.checkpoint_dir, model=self.model, optimizer=self.opts.combined, state=state,
                    extra_meta={"plan": self.plan, "config": self.cfg.to_dict()},
                    keep=self.cfg.checkpoint.keep, protect=protect)
        self.last_save_time, self.last_saved_step = time.monotonic(), state.step
        self.log(f"checkpoint: {path}" + (f" (best {self.cfg.checkpoint.best_metric} so far)" if best_step else ""))
        return path
