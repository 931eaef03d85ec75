"""The production Parquet loader: streams row groups of any number of files into ``Batch``es,
split over ranks and DataLoader workers, shuffled by seed, resumable mid-epoch.

Where things happen
-------------------
* ``ParquetLoader.__init__`` reads every file's footer (nothing else): schema, row-group sizes,
  label statistics. Bad input fails here, the same way on every rank, before training starts.
* ``_Source.worker_batches`` is the reading: one worker's share of one epoch, row group by
  row group, converted by ``columns.convert`` and cut into batches.
* ``ParquetLoader.__iter__`` runs that in the training process (``num_workers=0``) or in
  ``torch.utils.data.DataLoader`` worker processes, and merges the workers' batches in a
  fixed order.

Policies
--------
**Work split.** An epoch reads the row groups of all files in one order: file order, or (train
with ``data.shuffle``) a permutation drawn from ``(seed, epoch)``. Their rows form one
sequence of N rows; rank r of W owns rows ``[r*N//W, (r+1)*N//W)`` (shares differ by at most one
row; a row group on a boundary is read by both ranks, each keeping its part). A rank's rows
are split over its K workers in whole batches: worker w gets a contiguous block of
``nb//K`` or ``nb//K + 1`` batches (the first ``nb % K`` workers get the extra one), and the
rank yields them round-robin: worker 0's first batch, worker 1's first, ..., worker 0's second,
... Every row is therefore read by exactly one (rank, worker) per epoch.

**Same number of batches on every rank** (sharded lookups are collectives).
Training: ``nb = (N // W) // batch_size`` batches per rank; each rank uses the first
``nb * batch_size`` rows of its share and drops the rest: at most ``batch_size`` rows per rank
(plus the one extra row some ranks own). With shuffling the dropped rows differ every epoch;
without, the same ones are dropped. Evaluation: ``nb = ceil(ceil(N / W) / batch_size)``; every
real row is yielded exactly once and batches are completed with padding rows of weight 0
(label 0, dense 0, null id 0, empty bags). Every batch has exactly ``batch_size`` rows.

**Pass-through columns and labels** (batch prediction). ``passthrough=[...]`` names columns
(any type, e.g. a request id) that travel beside each batch as ``Batch.passthrough``, an Arrow
table with one row per batch row, null on padding rows. They are read with the row group and
go through every slice, permutation, concatenation and padding step together with the
converted columns (``columns.Rows``), so row i of the table is always row i of the batch; they
never become tensors. ``labels=False`` does not read the label column (files need not have
it); ``labels=None`` reads it only if every file has it.

**Shuffle** (training, ``data.shuffle``): (1) the row-group order per epoch, by
``(seed, epoch)``; (2) each worker cuts its rows into windows of ``data.shuffle_buffer`` rows
(rounded up to whole batches) and cuts batches from a uniform random permutation of each
window, so a batch is a uniform sample of a window spanning several randomly chosen row groups.
The permutation is built cheaply: each row-group slice is permuted while it is converted
(the gathers stay in cache), and a shuffled sequence of slice labels decides how many rows
each batch takes from each slice, so batches are assembled from contiguous runs (a uniform
order within each slice x a uniform arrangement of the labels is a uniform permutation of the
window). Seeds: (seed, epoch, rank, worker, position). ``shuffle=false`` reads rows in file
order (with K > 1 workers, each worker's block is in file order and the blocks are
interleaved batch by batch). Evaluation never shuffles. The same seed, world size, batch
size and ``num_workers`` give the same batches.

**Speed.** Arrow reads run in a background thread ``prefetch`` row groups ahead (they release
the GIL); columns are converted in parallel on as many threads as torch has intra-op threads in
the process (the trainer sets those to the cores per rank; DataLoader workers have one each).
Everything is vectorised numpy over whole columns; Python loops run over columns and batches,
never rows. ``python -m benchmarks loader`` measures it against raw pyarrow.

**Memory** per loader process: ``prefetch`` row groups read ahead (Arrow, configured columns
only) + the one being converted + one shuffle window + in-flight batches; independent of the
data set size.

**Resume.** ``state_dict()`` records the epoch and the number of batches consumed (plus, for
information, where each worker will restart: file, row group, offset). Replay is exact and
cheap: each worker skips its consumed batches by arithmetic (whole row groups are skipped by
their footer row counts, never read), re-reads only its current shuffle window (or the
partial row group) and drops the batches of that window already consumed. Resuming mid-epoch
needs the same data, world size, rank, batch size, workers, seed and shuffle settings (checked);
at an epoch boundary anything may change.

**Bad row groups mid-epoch** (corrupt pages, labels outside {0, 1}, mismatched weights):
the worker raises ``ValueError`` naming the file and the row group (and the column, when the
problem is in its values). In a
DataLoader worker the error is re-raised in the training process; under torchrun the failing
rank exits and the elastic agent then stops every other rank (which may be blocked in a
collective), so the run ends with that message instead of hanging. With
``data.skip_bad_row_groups=true`` the rows it would have given become weight-0 padding rows instead
(so batch counts, batch boundaries and resume positions do not change on any rank), each skip is
logged and recorded in ``loader.skipped``. Bad files and row groups found while reading the
footers (unreadable footers, empty files, zero-row row groups, label statistics outside
{0, 1}) are errors too, or, with the flag, left out of the plan on every rank alike.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from deepfm_dist.config import DataConfig
from deepfm_dist.data.batch import Batch
from deepfm_dist.data.columns import BadRowsError, Layout, Rows, convert
from deepfm_dist.data.parquet import open_parquet
from deepfm_dist.data.schema import (
    FeatureSpec,
    check_same_schema,
    check_schema,
    column_roles,
    feature_specs,
    value_type,
)

log = logging.getLogger(__name__)

STATE_VERSION = 1
_SEED_MASK = (1 << 64) - 1
_OPEN_FILES = 4
"""Parquet files kept open per reader thread (row groups of a file are often read in a row)."""


@dataclass(frozen=True)
class _Piece:
    """Rows ``[start, stop)`` of row group ``row_group`` of file ``file`` (an index), which
    are rows ``[pos, pos + stop - start)`` of the epoch's row sequence."""

    file: int
    row_group: int
    start: int
    stop: int
    pos: int


# --------------------------------------------------------------------------- footers


def _open_footer(path: str) -> tuple[pa.Schema, pq.FileMetaData] | Exception:
    try:
        with open_parquet(path) as pf:
            return pf.schema_arrow, pf.metadata
    except (OSError, pa.ArrowException) as e:
        return e


def _label_stats_problem(meta: pq.FileMetaData, rg: int, label_idx: int | None) -> str | None:
    """What the footer statistics of the label column say is wrong in row group ``rg``."""
    if label_idx is None:
        return None
    stats = meta.row_group(rg).column(label_idx).statistics
    if stats is None:
        return None
    if stats.has_null_count and stats.null_count:
        return f"{stats.null_count} null labels (footer statistics)"
    if stats.has_min_max:
        lo, hi = stats.min, stats.max
        if not isinstance(lo, (bool, int, float)):
            return None
        if lo < 0 or hi > 1:
            return f"labels in [{lo}, {hi}] (footer statistics), expected 0 or 1"
    return None


@dataclass
class _Footers:
    """What the footers say: the row groups ``[G, 3]`` (file, row group, rows) in file order,
    the skipped files/row groups (only with ``skip_bad_row_groups``), whether labels are
    read, and the pass-through columns with their types (None without any)."""

    groups: np.ndarray
    skipped: list[dict[str, Any]]
    labels: bool
    passthrough: pa.Schema | None


def _has_labels(paths: list[str], footers: list, label: str, labels: bool | None) -> bool:
    """``labels`` (True/False), or for None whether every readable file has the label column.

    Raises:
        ValueError: for None, some files have it and some do not (naming one of each).
    """
    if labels is not None:
        return labels
    has = {path: label in f[0].names for path, f in zip(paths, footers) if not isinstance(f, Exception)}
    if all(has.values()) or not any(has.values()):
        return bool(has) and all(has.values())
    with_ = next(p for p, h in has.items() if h)
    without = next(p for p, h in has.items() if not h)
    raise ValueError(
        f"{without}: no label column {label!r}, but {with_} has one; with labels read only where "
        "present, every file must have the label column or none"
    )


def _scan(paths: list[str], cfg: DataConfig, labels: bool | None = True,
          passthrough: Sequence[str] = ()) -> _Footers:
    """Reads every footer (see ``_Footers``); ``labels`` and ``passthrough`` as in
    ``ParquetLoader``.

    Raises:
        ValueError: a footer that cannot be read, a missing column, a wrong type, a file
            whose types differ from the first one, label statistics outside {0, 1}: naming the
            file (and row group / column). Empty files and zero-row row groups (valid Parquet,
            as Spark writes for empty partitions) are skipped and counted, never an error.
    """
    skip = cfg.skip_bad_row_groups
    # Footers are small reads; on an object store their latency dominates, so fetch in parallel.
    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        footers = list(pool.map(_open_footer, paths))
    with_labels = _has_labels(paths, footers, cfg.label, labels)
    roles = column_roles(cfg, label=with_labels, passthrough=passthrough)
    groups: list[tuple[int, int, int]] = []
    skipped: list[dict[str, Any]] = []
    first: tuple[str, dict[str, pa.DataType]] | None = None

    def bad(path: str, row_group: int | None, rows: int, reason: str) -> None:
        where = path if row_group is None else f"{path}: row group {row_group}"
        if not skip:
            raise ValueError(f"{where}: {reason} (data.skip_bad_row_groups=true skips it)")
        skipped.append({"file": path, "row_group": row_group, "rows": rows, "reason": reason})

    for file_idx, (path, footer) in enumerate(zip(paths, footers)):
        if isinstance(footer, Exception):
            bad(path, None, 0, f"not a readable Parquet file (truncated or corrupt?): {footer}")
            continue
        schema, meta = footer
        types = check_schema(path, schema, roles)
        if first is None:
            first = (path, types)
        else:
            check_same_schema(path, types, *first)
        if meta.num_rows == 0:  # a valid file without rows (Spark writes them for empty partitions)
            skipped.append({"file": path, "row_group": None, "rows": 0, "reason": "empty file (0 rows)"})
            continue
        columns = [meta.schema.column(i).path for i in range(meta.num_columns)]
        label_idx = columns.index(cfg.label) if with_labels and cfg.label in columns else None
        for rg in range(meta.num_row_groups):
            rows = meta.row_group(rg).num_rows
            if rows == 0:  # nothing to read, nothing wrong
                skipped.append({"file": path, "row_group": rg, "rows": 0, "reason": "zero-row row group"})
                continue
            problem = _label_stats_problem(meta, rg, label_idx)
            if problem is not None:
                bad(path, rg, rows, f"label column {cfg.label!r}: {problem}")
                continue
            groups.append((file_idx, rg, rows))
    if not groups:
        raise ValueError(f"the files hold 0 readable rows: {paths}")
    schema = None
    if passthrough:
        assert first is not None  # there are rows, so a file was read
        schema = pa.schema([pa.field(c, value_type(first[1][c])) for c in passthrough])
    return _Footers(np.array(groups, dtype=np.int64).reshape(-1, 3), skipped, with_labels, schema)


# --------------------------------------------------------------------------- reading


def _prefetched(fn: Callable[[Any], Any], items: Iterable[Any], depth: int) -> Iterator[tuple[Any, Any]]:
    """Yields ``(item, fn(item) or the exception it raised)`` in order; with ``depth`` > 0 a
    background thread runs ``fn`` up to ``depth`` items ahead (Arrow reads release the GIL)."""

    def call(item: Any) -> Any:
        try:
            return fn(item)
        except Exception as e:  # handed to the consumer, which decides (raise or skip)
            return e

    if depth == 0:
        for item in items:
            yield item, call(item)
        return
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(x: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put((item, call(item))):
                    return
        except BaseException as e:  # e.g. an error while producing the items
            put((None, e))
            return
        put(end)

    thread = threading.Thread(target=run, name="parquet-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            x = out.get()
            if x is end:
                return
            if x[0] is None:
                raise x[1]
            yield x
    finally:
        stop.set()
        thread.join(timeout=5)


class _FileCache:
    """A few open ``ParquetFile``s, least recently used closed first."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.open: OrderedDict[int, pq.ParquetFile] = OrderedDict()

    def get(self, file: int) -> pq.ParquetFile:
        if file in self.open:
            self.open.move_to_end(file)
        else:
            self.open[file] = open_parquet(self.paths[file])
            if len(self.open) > _OPEN_FILES:
                self.open.popitem(last=False)[1].close()
        return self.open[file]

    def close(self) -> None:
        for pf in self.open.values():
            pf.close()
        self.open.clear()


class _Rows:
    """Hands out exactly ``n`` rows at a time from a stream of ``Rows`` pieces."""

    def __init__(self, pieces: Iterator[Rows]):
        self.pieces = pieces
        self.buf: list[Rows] = []
        self.size = 0

    def take(self, n: int) -> Rows:
        return Rows.concat(self.take_parts(n))

    def take_parts(self, n: int) -> list[Rows]:
        """The next ``n`` rows as the pieces (or piece slices) that hold them."""
        while self.size < n:
            piece = next(self.pieces)
            self.buf.append(piece)
            self.size += len(piece)
        parts, need = [], n
        while need:
            head = self.buf[0]
            if len(head) <= need:
                parts.append(self.buf.pop(0))
                need -= len(head)
            else:
                parts.append(head.slice(0, need))
                self.buf[0] = head.slice(need, len(head))
                need = 0
        self.size -= n
        return parts


# --------------------------------------------------------------------------- the plan


class _Source:
    """Everything a worker needs to produce its batches of an epoch (picklable, no open files)."""

    def __init__(self, paths: list[str], groups: np.ndarray, cfg: DataConfig, *, batch_size: int,
                 rank: int, world_size: int, train: bool, seed: int, labels: bool = True,
                 passthrough: pa.Schema | None = None):
        self.paths = paths
        self.groups = groups
        self.layout = Layout.from_config(cfg, labels=labels, passthrough=passthrough)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.train = train
        self.seed = seed & _SEED_MASK
        self.shuffle = train and cfg.shuffle
        b = batch_size
        self.window = b * math.ceil(cfg.shuffle_buffer / b) if self.shuffle and cfg.shuffle_buffer else 0
        self.prefetch = cfg.prefetch
        self._order_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self.skip_bad = cfg.skip_bad_row_groups
        self.num_rows = int(groups[:, 2].sum())
        n, w = self.num_rows, world_size
        self.num_batches = (n // w) // b if train else math.ceil(math.ceil(n / w) / b)
        self.rank_start = rank * n // w
        share = (rank + 1) * n // w - self.rank_start
        self.rank_rows = self.num_batches * b if train else share
        """Real rows this rank yields per epoch (its share, less the dropped tail in training)."""

    # ----------------------------------------------------------------- arithmetic

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Row-group indices in this epoch's reading order, and the end row of each in the
        epoch's row sequence (cached: ``state_dict`` may ask after every batch)."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch & _SEED_MASK]).permutation(len(self.groups))
            else:
                order = np.arange(len(self.groups))
            self._order_cache = (epoch, order, np.cumsum(self.groups[order, 2]))
        return self._order_cache[1], self._order_cache[2]

    def worker_block(self, worker: int, workers: int) -> tuple[int, int]:
        """Worker's first batch (within the rank) and number of batches."""
        q, rem = divmod(self.num_batches, workers)
        return worker * q + min(worker, rem), q + (worker < rem)

    def worker_rows(self, worker: int, workers: int) -> tuple[int, int]:
        """Worker's real rows ``[lo, hi)`` as global row positions in the epoch's order."""
        first, count = self.worker_block(worker, workers)
        b = self.batch_size
        lo = min(first * b, self.rank_rows)
        hi = min((first + count) * b, self.rank_rows)
        return self.rank_start + lo, self.rank_start + hi

    @staticmethod
    def consumed(batches: int, worker: int, workers: int) -> int:
        """Batches of ``worker`` among the rank's first ``batches`` (round-robin order)."""
        return batches // workers + (worker < batches % workers)

    def replay_start(self, worker: int, workers: int, skip: int) -> tuple[int, int]:
        """Where a worker that already delivered ``skip`` batches restarts reading: the global
        row position, and how many batches of that point's window to drop."""
        lo, hi = self.worker_rows(worker, workers)
        done_rows = skip * self.batch_size
        if self.window:
            window = done_rows // self.window
            return lo + window * self.window, (done_rows - window * self.window) // self.batch_size
        return lo + done_rows, 0

    def pieces(self, epoch: int, lo: int, hi: int, cut_every: int = 0, first_only: bool = False) -> list[_Piece]:
        """Row-group slices covering global rows ``[lo, hi)`` of an epoch's order; with
        ``cut_every``, also cut at ``lo + k * cut_every`` (so no piece spans two windows)."""
        if lo >= hi:
            return []
        order, ends = self.order(epoch)
        rows = self.groups[order, 2]
        out = []
        i = int(np.searchsorted(ends, lo, side="right"))
        while i < len(order):
            start = int(ends[i] - rows[i])
            if start >= hi:
                break
            f, rg = int(self.groups[order[i], 0]), int(self.groups[order[i], 1])
            a, end = max(lo, start), min(hi, int(ends[i]))
            while a < end:
                b = min(end, lo + ((a - lo) // cut_every + 1) * cut_every) if cut_every else end
                out.append(_Piece(f, rg, a - start, b - start, a))
                if first_only:
                    return out
                a = b
            i += 1
        return out

    def position(self, epoch: int, worker: int, workers: int, skip: int) -> dict[str, Any]:
        """Where the worker resumes: file, row group, offset in it, batches dropped there."""
        start, drop = self.replay_start(worker, workers, skip)
        _, hi = self.worker_rows(worker, workers)
        pieces = self.pieces(epoch, start, hi, first_only=True)
        if not pieces:
            return {"worker": worker, "done": True}
        p = pieces[0]
        return {"worker": worker, "file": self.paths[p.file], "row_group": p.row_group,
                "offset": p.start, "window_batches_done": drop}

    # ----------------------------------------------------------------- reading

    def _read_table(self, files: _FileCache, last: dict, piece: _Piece) -> pa.Table:
        key = (piece.file, piece.row_group)
        if key in last:  # the next piece of the row group just read (cut at a window end)
            table = last[key]
        else:
            pf = files.get(piece.file)
            table = pf.read_row_group(piece.row_group, columns=self.layout.columns)
            expected = int(pf.metadata.row_group(piece.row_group).num_rows)
            if table.num_rows != expected:
                raise OSError(f"read {table.num_rows} rows, the footer promised {expected}")
            last.clear()
            last[key] = table
        if piece.start or piece.stop != table.num_rows:
            table = table.slice(piece.start, piece.stop - piece.start)
        return table

    def read(self, pieces: list[_Piece], events: list[dict[str, Any]],
             permute: tuple[int, ...] | None = None) -> Iterator[Rows]:
        """Converted rows of ``pieces``, in order; a bad row group raises, or with
        ``skip_bad_row_groups`` becomes padding rows and an entry in ``events``. With
        ``permute`` (an rng key), each piece's rows come in a random order drawn from
        ``(*permute, piece.pos)``."""
        files, last = _FileCache(self.paths), {}
        # As many conversion threads as torch has intra-op threads in this process: the
        # trainer sizes those to the cores per rank (DataLoader workers get 1).
        threads = torch.get_num_threads()
        pool = ThreadPoolExecutor(threads, thread_name_prefix="parquet-convert") if threads > 1 else None
        tables = _prefetched(lambda p: self._read_table(files, last, p), pieces, self.prefetch)
        try:
            for piece, table in tables:
                where = f"{self.paths[piece.file]}: row group {piece.row_group}"
                try:
                    if isinstance(table, Exception):
                        raise ValueError(f"{where}: cannot be read ({type(table).__name__}: {table})") from table
                    order = None
                    if permute is not None:
                        order = np.random.default_rng([*permute, piece.pos]).permutation(table.num_rows)
                    rows = convert(table, self.layout, where, order, pool, first_row=piece.start)
                except (BadRowsError, ValueError, pa.ArrowException) as e:
                    if not self.skip_bad:
                        if isinstance(e, BadRowsError) or str(e).startswith(where):
                            raise
                        raise ValueError(f"{where}: {e}") from e
                    n = piece.stop - piece.start
                    event = {"file": self.paths[piece.file], "row_group": piece.row_group,
                             "rows": n, "reason": str(e)}
                    log.warning("skipping %s rows of %s (data.skip_bad_row_groups): %s", n, where, e)
                    events.append(event)
                    rows = Rows.padding(self.layout, n)
                yield rows
        finally:
            tables.close()  # stops the read-ahead thread before its files are closed
            files.close()
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def worker_batches(self, epoch: int, worker: int, workers: int, skip: int) -> Iterator[tuple[Batch, list]]:
        """This worker's batches of ``epoch`` after the first ``skip``; each with the skip
        events (bad row groups) found while making it."""
        first, count = self.worker_block(worker, workers)
        if skip >= count:
            return
        b = self.batch_size
        _, hi = self.worker_rows(worker, workers)
        start, drop = self.replay_start(worker, workers, skip)
        events: list[dict[str, Any]] = []
        key = (self.seed, epoch & _SEED_MASK, self.rank, worker)
        pieces = self.pieces(epoch, start, hi, self.window)
        rows = _Rows(self.read(pieces, events, key if self.window else None))

        def emit(r: Rows) -> tuple[Batch, list]:
            out = (r.to_batch(self.layout), list(events))
            events.clear()
            return out

        if self.window:  # training: rows are a whole number of batches, windows too
            lo, _ = self.worker_rows(worker, workers)
            for wstart in range(start, hi, self.window):
                size = min(self.window, hi - wstart)
                index = (wstart - lo) // self.window
                rng = np.random.default_rng([*key, index, 1 << 62])
                # A uniform permutation of the window, done cheaply: each piece was permuted
                # while converted (``read``); how many rows each batch takes from each piece
                # is drawn as in a uniformly shuffled sequence of piece labels (multivariate
                # hypergeometric counts); a batch is then a few contiguous slices. (A uniform
                # permutation of the window is exactly: uniformly arranged piece labels x an
                # independent uniform order within each piece.)
                parts = rows.take_parts(size)  # whole pieces: they were cut at the window ends
                left = np.array([len(p) for p in parts], dtype=np.int64)
                cursor = np.zeros(len(parts), dtype=np.int64)
                for j in range(size // b):
                    counts = rng.multivariate_hypergeometric(left, b)
                    left -= counts
                    if j >= drop:
                        yield emit(Rows.concat([
                            parts[i].slice(int(cursor[i]), int(cursor[i] + counts[i]))
                            for i in np.flatnonzero(counts)
                        ]))
                    cursor += counts
                drop = 0
            return
        position = start
        for _ in range(skip, count):
            real = max(0, min(b, hi - position))
            batch_rows = rows.take(real) if real else None
            position += real
            if real < b:  # evaluation's last batches: complete with weight-0 rows
                pad = Rows.padding(self.layout, b - real)
                batch_rows = pad if batch_rows is None else Rows.concat([batch_rows, pad])
            yield emit(batch_rows)


class _WorkerDataset(IterableDataset):
    """One epoch of a rank, split over DataLoader workers; yields (worker, index, batch, events)."""

    def __init__(self, source: _Source, epoch: int, skips: list[int]):
        self.source, self.epoch, self.skips = source, epoch, skips

    def __iter__(self) -> Iterator[tuple[int, int, Batch, list]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        skip = self.skips[worker]
        for j, (batch, events) in enumerate(self.source.worker_batches(self.epoch, worker, workers, skip)):
            yield worker, skip + j, batch, events


def _worker_init(_: int) -> None:
    from deepfm_dist.distributed.env import unpin_cpu_cores  # train.pin_cpus pinned the rank, not its workers

    unpin_cpu_cores()


def _identity(x: Any) -> Any:
    return x


# --------------------------------------------------------------------------- the loader


GPU_WORKERS = 4
"""``data.num_workers`` auto on a GPU rank: enough readers to keep a fast step fed."""


def auto_num_workers(requested: int, device_type: str, local_world_size: int = 1, most: int = GPU_WORKERS) -> int:
    """``data.num_workers`` as run: ``requested`` if >= 0; auto (-1): 0 on CPU, else up to
    ``most`` per rank, leaving one of the rank's share of this node's cores to the rank."""
    if requested >= 0:
        return requested
    if device_type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(most, cores // max(1, local_world_size) - 1))


class ParquetLoader:
    """Streams this rank's share of Parquet rows as fixed-size ``Batch``es (see the module
    docstring for the policies).

    Args:
        files: Parquet files (``resolve_parquet_paths``); their order is the file order.
        cfg: the data configuration (columns, transforms, shuffle, workers, ...).
        batch_size: rows per batch on this rank.
        rank, world_size: this rank and the number of ranks.
        train: True: shuffled (``cfg.shuffle``), tail dropped; False (evaluation): file
            order, every row exactly once, padding rows of weight 0.
        seed: seeds the shuffles (with the epoch); the same on every rank.
        pin_memory: pin batches for asynchronous copies to a GPU (ignored without CUDA).
        labels: True: every file must have the label column (``cfg.label``); False: it is
            not read (and need not exist), ``Batch.labels`` are 0; None: read it if every
            file has it, else as False (some files with it and some without is an error).
        passthrough: columns to carry beside each batch as ``Batch.passthrough``, an Arrow
            table with one row per batch row (row i is batch row i; null on padding rows;
            any type, nulls and values exactly as in the file, dictionaries decoded), e.g.
            request ids for predictions. They must exist in every file with the same type;
            a column may also be one of the configured ones. Kept on the host, never
            converted: pair them with the real rows (``weights > 0``) of the outputs.

    Attributes:
        num_rows: rows in all files (less row groups skipped while reading the footers).
        rank_rows: real rows this rank yields per epoch.
        feature_specs: ``schema.FeatureSpec`` per sparse column, what the model is built from.
        has_labels: whether labels are read (see ``labels``).
        passthrough_schema: the pass-through columns and their types, or None.
        skipped: bad files/row groups skipped (``data.skip_bad_row_groups``), as dicts with
            file, row_group, rows and reason.
    """

    def __init__(self, files: list[str], cfg: DataConfig, *, batch_size: int, rank: int,
                 world_size: int, train: bool, seed: int, pin_memory: bool = False,
                 labels: bool | None = True, passthrough: Sequence[str] = (), num_workers: int | None = None):
        if not files:
            raise ValueError("ParquetLoader: files is empty, expected at least one Parquet file")
        if batch_size < 1:
            raise ValueError(f"ParquetLoader: batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ParquetLoader: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        passthrough = list(passthrough)
        if not all(isinstance(c, str) and c for c in passthrough) or len(set(passthrough)) < len(passthrough):
            raise ValueError(f"ParquetLoader: passthrough must be distinct column names, got {passthrough}")
        self.files = list(files)
        self.train = train
        self.num_workers = auto_num_workers(cfg.num_workers, "cpu") if num_workers is None else num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.feature_specs: list[FeatureSpec] = feature_specs(cfg)
        footers = _scan(self.files, cfg, labels, passthrough)
        self.skipped = footers.skipped
        self.has_labels = footers.labels
        self.passthrough_schema = footers.passthrough
        self._source = _Source(self.files, footers.groups, cfg, batch_size=batch_size, rank=rank,
                               world_size=world_size, train=train, seed=seed, labels=footers.labels,
                               passthrough=footers.passthrough)
        self.num_rows = self._source.num_rows
        self.rank_rows = self._source.rank_rows
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self._epoch = 0
        self._resume = 0  # batches of self._epoch to skip at the next iter()
        self._consumed = 0  # batches of self._epoch delivered (by the last/current iter())
        self.wait_seconds = 0.0
        """Time the consumer spent waiting inside ``next()`` for a batch, over all iterations
        (compare with the step time: the loader should never be what a step waits for)."""

    def __len__(self) -> int:
        """Batches this rank yields per epoch; identical on every rank."""
        return self._source.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Selects epoch ``epoch``'s shuffle order for the next ``iter()``; a pending resume
        position (``load_state_dict``) is kept only if it is for this epoch."""
        if epoch != self._epoch:
            self._epoch, self._resume, self._consumed = epoch, 0, 0

    def _fingerprint(self) -> dict[str, Any]:
        s = self._source
        return {
            "world_size": self.world_size, "rank": self.rank, "batch_size": self.batch_size,
            "num_workers": max(1, self.num_workers), "train": self.train, "shuffle": s.shuffle,
            "window": s.window, "seed": s.seed, "num_rows": self.num_rows,
            "num_row_groups": int(len(s.groups)), "num_files": len(self.files),
        }

    def state_dict(self) -> dict[str, Any]:
        """The epoch and the batches of it consumed so far (small, JSON-able); with it a new
        loader's ``iter()`` continues right after them. Also records, per worker, the file,
        row group and offset where reading resumes (for information)."""
        workers = max(1, self.num_workers)
        consumed = self._consumed or self._resume
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "batches": consumed,
            "num_batches": len(self),
            **self._fingerprint(),
            "positions": [
                self._source.position(self._epoch, w, workers, self._source.consumed(consumed, w, workers))
                for w in range(workers)
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next ``iter()`` resumes epoch ``state["epoch"]`` right after its first
        ``state["batches"]`` batches.

        Raises:
            ValueError: mid-epoch state saved under another layout (world size, rank, batch
                size, workers, shuffle, seed or data), naming what differs.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches == int(state.get("num_batches", -1)):
            self._epoch, self._resume, self._consumed = epoch, len(self), 0  # epoch complete
            return
        if batches:
            mine = self._fingerprint()
            diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
            if diff:
                raise ValueError(
                    "cannot resume mid-epoch (batch "
                    f"{batches} of epoch {epoch}): the loader state was saved with a different "
                    "layout; saved vs now: "
                    + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items())
                    + " (resume at an epoch boundary, or keep these the same)"
                )
        self._epoch, self._resume, self._consumed = epoch, min(batches, len(self)), 0

    def keep_saved_workers(self, state: dict[str, Any]) -> None:
        """Read with the worker count a mid-epoch ``state`` was saved with (``data.num_workers``
        auto): the batch order depends on it, and the device that chose it may have changed."""
        if int(state.get("batches", 0)) != int(state.get("num_batches", -1)):
            saved = int(state.get("num_workers", 1))
            if saved != max(1, self.num_workers):
                self.num_workers = saved

    def __iter__(self) -> Iterator[Batch]:
        """This rank's batches of the current epoch (``set_epoch``), from the resume position
        if ``load_state_dict`` set one, else from the start."""
        # Set up now, not at the first next(): state_dict() right after iter() is already
        # this iteration's (start) position.
        epoch, start = self._epoch, self._resume
        self._resume, self._consumed = 0, start
        return self._batches(epoch, start)

    def _batches(self, epoch: int, start: int) -> Iterator[Batch]:
        workers = max(1, self.num_workers)
        skips = [_Source.consumed(start, w, workers) for w in range(workers)]
        dataset = _WorkerDataset(self._source, epoch, skips)
        if self.num_workers == 0:
            stream: Iterator = iter(dataset)
        else:
            stream = iter(DataLoader(
                dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                pin_memory=self.pin_memory, persistent_workers=False, worker_init_fn=_worker_init,
                # fork: workers start in milliseconds (spawn re-imports torch and torchrec,
                # seconds each); they never touch CUDA or the process group.
                multiprocessing_context="fork" if "fork" in mp.get_all_start_methods() else None,
            ))
        # Workers' batches are put in the rank's order: batch k is worker k % K's (k // K)-th.
        # DataLoader already delivers round-robin, so this holds at most K batches, and the
        # order does not depend on it.
        pending: dict[tuple[int, int], tuple[Batch, list]] = {}
        waited_from = time.perf_counter()
        try:
            for k in range(start, len(self)):
                want = (k % workers, k // workers)
                while want not in pending:
                    try:
                        worker, index, batch, events = next(stream)
                    except StopIteration:
                        raise RuntimeError(
                            f"ParquetLoader: the workers stopped before batch {k} of {len(self)} "
                            f"(rank {self.rank}); this is a bug"
                        ) from None
                    pending[(worker, index)] = (batch, events)
                batch, events = pending.pop(want)
                self.skipped.extend(events)
                if self.pin_memory and self.num_workers == 0:
                    batch = batch.pin_memory()
                self._consumed = k + 1
                self.wait_seconds += time.perf_counter() - waited_from
                yield batch
                waited_from = time.perf_counter()
        finally:
            del stream
