"""Frequency vocabularies for the categorical columns (``--vocab-threshold T``).

Per column ``C1..C26``, counted over the TRAIN split only (``all`` for ``--split none``),
so val/test values never influence the mapping:

* a value seen at least ``T`` times gets its own id ``1..n``, by descending count (ties:
  smaller value first), so id 1 is the most frequent value;
* id 0 is shared by every rare value (seen fewer than ``T`` times) and by every value
  the train split never had (e.g. new in val/test);
* an empty field (null) is counted as the value ``-1`` (real values are 32-bit hashes,
  >= 0, so it cannot collide): frequent nulls get their own id like any value.

An embedding table for the column therefore needs ``n + 1`` rows. ``DIR/vocab/C1.parquet``
holds ``value``, ``id``, ``count`` (int64) in id order; ``load_vocab`` and ``apply_vocab``
are what a loader uses.

Memory: counting keeps every distinct value of a column (16 bytes each, ~3x during a
merge). A pass holds at most ``MAX_DISTINCT_PER_PASS`` values: a column with more is counted in
P passes over disjoint value sets (``value mod P``), each reading the column again, so the
memory of a count does not grow with the data (Kaggle's largest column has ~10M distinct
values, a Terabyte column up to ~200M). P starts at ``--vocab-partitions`` and is raised, from
the distinct values a pass had seen when it reached the limit, until every pass fits.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deepfm_dist.prepare import state, tsv

NULL_VALUE = -1
"""Stands for an empty field (null) in vocabularies."""

COLUMNS = tsv.SPARSE
"""The categorical columns that get a vocabulary."""
VOCAB_SCHEMA = pa.schema([("value", pa.int64()), ("id", pa.int64()), ("count", pa.int64())])


def _merge(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sums the counts of equal values over several (sorted-unique values, counts) pairs."""
    values = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    if values.size == 0:
        return values, counts
    order = np.argsort(values, kind="stable")
    values, counts = values[order], counts[order]
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    return values[starts], np.add.reduceat(counts, starts)


MAX_DISTINCT_PER_PASS = 1 << 21
"""Distinct values one counting pass may hold (32 MB of values and counts; a merge of the held
and the pending values takes ~4x that)."""


class TooManyValues(Exception):
    """A pass reached its limit of distinct values; ``estimate`` is the column's projected total."""

    def __init__(self, estimate: int) -> None:
        super().__init__(estimate)
        self.estimate = estimate


def count_values(files: list[str], column: str, partitions: int = 1, partition: int = 0,
                 limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of ``column`` over ``files`` (nulls as ``NULL_VALUE``) and their counts.

    Only values with ``value mod partitions == partition`` are counted. Returns sorted
    values and their counts (int64). Raises TooManyValues once more than ``limit`` distinct
    values are held, projecting the column's total from the share of rows read.
    """
    acc: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    pending_size = rows_read = 0
    for path in files:
        with pq.ParquetFile(path) as pf:
            for batch in pf.iter_batches(columns=[column], batch_size=1 << 20):
                values = pc.fill_null(batch.column(0), NULL_VALUE).to_numpy()
                rows_read += values.size
                if partitions > 1:
                    values = values[values % partitions == partition]
                u, c = np.unique(values, return_counts=True)
                pending.append((u, c.astype(np.int64)))
                pending_size += u.size
                # Merge once the pending pieces outgrow the total so far: each value is
                # re-sorted O(log) times overall, and memory stays ~3x the distinct count.
                if pending_size > max(acc[0].size, (limit or 1 << 23) // 2):
                    acc = _merge([acc, *pending])
                    pending, pending_size = [], 0
                    if limit and acc[0].size > limit:
                        total_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
                        raise TooManyValues(acc[0].size * partitions * total_rows // rows_read)
    acc = _merge([acc, *pending])
    if limit and acc[0].size > limit:
        raise TooManyValues(acc[0].size * partitions)
    return acc


def build_column(out_dir: str, files: list[str], column: str, threshold: int, partitions: int) -> dict[str, Any]:
    """Counts ``column`` over ``files`` and writes ``out_dir/vocab/<column>.parquet``."""
    while True:
        kept_values, kept_counts = [], []
        distinct = total = 0
        try:
            for p in range(partitions):
                values, counts = count_values(files, column, partitions, p, limit=MAX_DISTINCT_PER_PASS)
                distinct += values.size
                total += int(counts.sum())
                keep = counts >= threshold
                kept_values.append(values[keep])
                kept_counts.append(counts[keep])
                del values, counts
            break
        except TooManyValues as e:  # more passes, each holding at most the limit (with a margin)
            partitions = max(2 * partitions, -(-3 * e.estimate // (2 * MAX_DISTINCT_PER_PASS)))
    values = np.concatenate(kept_values)
    counts = np.concatenate(kept_counts)
    order = np.lexsort((values, -counts))  # by descending count, then ascending value
    values, counts = values[order], counts[order]
    ids = np.arange(1, values.size + 1, dtype=np.int64)
    table = pa.Table.from_arrays([pa.array(values), pa.array(ids), pa.array(counts)], schema=VOCAB_SCHEMA)
    final = os.path.join(out_dir, state.VOCAB_DIR, f"{column}.parquet")
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = state.tmp_path(final)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {
        "column": column,
        "ids": int(values.size),
        "num_embeddings": int(values.size) + 1,
        "distinct": distinct,
        "rows": total,
        "rows_with_own_id": int(counts.sum()),
        "passes": partitions,
        "bytes": os.path.getsize(final),
    }


def load_vocab(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reads the vocabularies written by ``prepare-criteo --vocab-threshold``.

    Args:
        path: the converter's output directory, or its ``vocab/`` subdirectory.

    Returns:
        ``{column: (values_sorted, ids)}`` for every ``C*.parquet`` found: int64 arrays,
        values ascending (``NULL_VALUE`` = -1 for nulls), for ``apply_vocab``.
    """
    vocab_dir = os.path.join(path, state.VOCAB_DIR) if os.path.isdir(os.path.join(path, state.VOCAB_DIR)) else path
    names = sorted(n for n in os.listdir(vocab_dir) if n.endswith(".parquet") and not n.startswith((".", "_")))
    if not names:
        raise FileNotFoundError(f"{vocab_dir}: no vocabulary files (C1.parquet, ...); run prepare-criteo with --vocab-threshold")
    out = {}
    for name in names:
        table = pq.read_table(os.path.join(vocab_dir, name), columns=["value", "id"])
        values = table.column("value").to_numpy()
        ids = table.column("id").to_numpy()
        order = np.argsort(values, kind="stable")
        out[name[: -len(".parquet")]] = (values[order].astype(np.int64), ids[order].astype(np.int64))
    return dict(sorted(out.items(), key=lambda kv: state.natural_key(kv[0])))


def apply_vocab(
    values_sorted: np.ndarray, ids: np.ndarray, raw: np.ndarray, valid: np.ndarray | None = None
) -> np.ndarray:
    """Maps raw categorical values to vocabulary ids (0 for rare or unseen values).

    Args:
        values_sorted, ids: one column's vocabulary from ``load_vocab``.
        raw: int array ``[N]`` of raw values (the Parquet column; nulls either already
            filled with ``NULL_VALUE`` or marked by ``valid``).
        valid: optional bool array ``[N]``, False where the value is null.

    Returns:
        int64 array ``[N]`` of ids in ``[0, len(ids)]``.
    """
    raw = np.asarray(raw, dtype=np.int64)
    if valid is not None:
        raw = np.where(np.asarray(valid, dtype=bool), raw, NULL_VALUE)
    if values_sorted.size == 0:
        return np.zeros(raw.shape, dtype=np.int64)
    pos = np.searchsorted(values_sorted, raw)
    pos = np.minimum(pos, values_sorted.size - 1)
    hit = values_sorted[pos] == raw
    return np.where(hit, ids[pos], 0).astype(np.int64, copy=False)


def vocab_task(args: tuple[str, list[str], str, int, int]) -> dict[str, Any]:
    """Pool entry point: ``(out_dir, files, column, threshold, partitions)``."""
    return build_column(*args)
