"""Rows in model form: Arrow columns -> ``Rows`` (numpy, column-wise) -> ``Batch``.

``convert`` turns a slice of one row group (an Arrow table with the configured columns) into
``Rows``; ``Rows`` support the few operations a loader needs (slice, concat, padding)
on whole columns; ``Rows.to_batch`` builds the torchrec ``Batch``. Everything is vectorised
over rows (numpy/Arrow compute); Python loops run over columns, never over rows.

Transforms (documented once, here):

* label -> float32; any value other than 0/1, or a null, is an error. A loader told not to
  read labels (``Layout.label`` None) gives 0 for every row.
* dense -> float32; nulls, NaN and +-inf -> 0, then ``log1p(max(x, 0))`` (``dense_transform
  = "log1p"``, the default: counts are heavy-tailed and Criteo's I2 has small negative values)
  or nothing (``"none"``).
* sparse -> table rows in ``[0, num_embeddings)`` by ``hashing.hash_ids`` (row 0 = null);
  strings are first hashed to 64 bits by ``hashing.hash_strings``. Multi-hot (list) columns:
  the same per element; a null or empty list is an empty bag; a null element is row 0.
* weights (``data.weighted``) -> float32, one per id, same lengths as the ids (else an error;
  a null weight is an error too).
* pass-through columns (``Layout.passthrough``) -> an Arrow table of the same rows, values as
  in the file (any type, nulls kept; dictionary columns decoded), in the same order as the
  converted rows; padding rows are all null. It never becomes a tensor.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from deepfm_dist.config import DataConfig
from deepfm_dist.data.batch import Batch
from deepfm_dist.data import vocab as data_vocab
from deepfm_dist.data.hashing import hash_ids, hash_strings
from deepfm_dist.prepare.vocab import apply_vocab
from deepfm_dist.data.schema import is_string


class BadRowsError(ValueError):
    """Values that break the data contract (labels outside {0, 1}, null weights, ...)."""


@dataclass
class Jagged:
    """A multi-hot feature over ``n`` rows: ``lengths`` int32 ``[n]``, ``values`` int64
    ``[sum(lengths)]``, ``weights`` float32 like ``values`` or None."""

    lengths: np.ndarray
    values: np.ndarray
    weights: np.ndarray | None
    _offsets: np.ndarray | None = field(default=None, repr=False, compare=False)

    def offsets(self) -> np.ndarray:
        """int64 ``[n + 1]``: row i's ids are ``values[offsets[i]:offsets[i + 1]]`` (cached)."""
        if self._offsets is None:
            out = np.zeros(self.lengths.size + 1, dtype=np.int64)
            np.cumsum(self.lengths, out=out[1:])
            self._offsets = out
        return self._offsets

    def take(self, idx: np.ndarray) -> Jagged:
        """Rows ``idx`` (int64 ``[m]``), in that order."""
        o = self.offsets()
        lengths = np.take(self.lengths, idx)
        # Element positions of the chosen rows, in order: each row's start repeated over its
        # length, plus 0, 1, ... within the row.
        total = int(lengths.sum())
        new_starts = np.zeros(idx.size, dtype=np.int64)
        np.cumsum(lengths[:-1], out=new_starts[1:])
        pos = np.repeat(np.take(o, idx) - new_starts, lengths) + np.arange(total)
        return Jagged(lengths, np.take(self.values, pos),
                      None if self.weights is None else np.take(self.weights, pos))


@dataclass
class Rows:
    """``n`` converted rows, column-wise.

    labels: float32 ``[n]``; weights: float32 ``[n]`` (1 real row, 0 padding);
    dense: float32 ``[F_dense, n]`` (column-major: transposed per batch, where it is cheap,
    in cache); ids: int64 ``[F_scalar, n]`` (one-id features, in key
    order); id_weights: float32 ``[F_scalar, n]`` or None (only with a weighted one-id
    feature; 1.0 for the others); jagged: one ``Jagged`` per multi-hot feature, in key order;
    passthrough: Arrow table of ``n`` rows with the ``Layout.passthrough`` columns, or None.
    Every operation below applies to all of them alike, which is what keeps a pass-through
    row beside its converted row.
    """

    labels: np.ndarray
    weights: np.ndarray
    dense: np.ndarray
    ids: np.ndarray
    id_weights: np.ndarray | None
    jagged: list[Jagged]
    passthrough: pa.Table | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    def slice(self, start: int, stop: int) -> Rows:
        """Rows ``[start, stop)`` (views where possible)."""
        jagged = []
        for j in self.jagged:
            o = j.offsets()
            lo, hi = o[start], o[stop]
            jagged.append(Jagged(j.lengths[start:stop], j.values[lo:hi],
                                 None if j.weights is None else j.weights[lo:hi]))
        return Rows(
            self.labels[start:stop], self.weights[start:stop], self.dense[:, start:stop],
            self.ids[:, start:stop],
            None if self.id_weights is None else self.id_weights[:, start:stop],
            jagged,
            None if self.passthrough is None else self.passthrough.slice(start, stop - start),
        )

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        return Rows(
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.weights for p in parts]),
            np.concatenate([p.dense for p in parts], axis=1),
            np.concatenate([p.ids for p in parts], axis=1),
            None if first.id_weights is None else np.concatenate([p.id_weights for p in parts], axis=1),
            [
                Jagged(
                    np.concatenate([p.jagged[k].lengths for p in parts]),
                    np.concatenate([p.jagged[k].values for p in parts]),
                    None if first.jagged[k].weights is None
                    else np.concatenate([p.jagged[k].weights for p in parts]),
                )
                for k in range(len(first.jagged))
            ],
            None if first.passthrough is None else pa.concat_tables([p.passthrough for p in parts]),
        )

    @staticmethod
    def padding(layout: Layout, n: int) -> Rows:
        """``n`` weight-0 rows: label 0, dense 0, every one-id feature at the null row 0,
        every multi-hot feature an empty bag, every pass-through value null."""
        schema = layout.passthrough
        return Rows(
            np.zeros(n, np.float32), np.zeros(n, np.float32),
            np.zeros((layout.num_dense, n), np.float32),
            np.zeros((layout.num_scalar, n), np.int64),
            np.ones((layout.num_scalar, n), np.float32) if layout.scalar_weighted else None,
            [
                Jagged(np.zeros(n, np.int32), np.zeros(0, np.int64),
                       np.zeros(0, np.float32) if w else None)
                for w in layout.jagged_weighted
            ],
            None if schema is None else pa.Table.from_arrays([pa.nulls(n, f.type) for f in schema], schema=schema),
        )

    def to_batch(self, layout: Layout) -> Batch:
        """A torchrec ``Batch`` (see ``batch.Batch``): ``sparse_features`` holds the
        unweighted features, ``weighted_features`` the weighted ones with their per-id weights
        (None if there are none); keys in ``data.sparse`` order, values key-major, int32
        lengths; ``passthrough`` the pass-through table (a compact copy: a batch never keeps
        or pickles a whole row group's buffers)."""
        ids = self.ids if self.ids.flags.c_contiguous else np.ascontiguousarray(self.ids)
        weighted = self._kjt(layout, layout.weighted_keys, ids, weighted=True) if layout.weighted_keys else None
        return Batch(
            dense_features=torch.from_numpy(_owned(np.ascontiguousarray(self.dense.T))),
            sparse_features=self._kjt(layout, layout.plain_keys, ids, weighted=False),
            labels=torch.from_numpy(_owned(self.labels)),
            weights=torch.from_numpy(_owned(self.weights)),
            weighted_features=weighted,
            passthrough=None if self.passthrough is None else self.passthrough.take(np.arange(len(self))),
        )

    def _kjt(self, layout: Layout, keys: list[str], ids: np.ndarray, weighted: bool) -> KeyedJaggedTensor:
        b = len(self)
        slots = [layout.slot[k] for k in keys]
        if not weighted and not self.jagged and [k for _, k in slots] == list(range(ids.shape[0])):
            # The common case (every feature one id per row, none weighted): the id matrix
            # [F, B] already is the key-major values.
            values = ids.reshape(-1)
            lengths = np.ones(values.size, dtype=np.int32)
            length_per_key = [b] * len(keys)
            kjt_weights = None
        else:
            v, ln, w, length_per_key = [], [], [], []
            for kind, k in slots:
                if kind == "scalar":
                    v.append(ids[k])
                    ln.append(np.ones(b, dtype=np.int32))
                    length_per_key.append(b)
                    if weighted:
                        w.append(self.id_weights[k])
                else:
                    j = self.jagged[k]
                    v.append(j.values)
                    ln.append(j.lengths)
                    length_per_key.append(int(j.values.size))
                    if weighted:
                        w.append(j.weights)
            values = np.concatenate(v) if v else np.zeros(0, np.int64)
            lengths = np.concatenate(ln) if ln else np.zeros(0, np.int32)
            kjt_weights = np.concatenate(w) if weighted else None
        offset_per_key = [0]
        for n in length_per_key:
            offset_per_key.append(offset_per_key[-1] + n)
        return KeyedJaggedTensor(
            keys=list(keys),
            values=torch.from_numpy(_owned(values)),
            weights=None if kjt_weights is None else torch.from_numpy(_owned(kjt_weights)),
            lengths=torch.from_numpy(_owned(lengths)),
            stride=b,
            # Given here, so nothing downstream has to sync them from the lengths tensor.
            length_per_key=length_per_key,
            offset_per_key=offset_per_key,
        )


def _owned(x: np.ndarray) -> np.ndarray:
    """A contiguous array that owns its memory (or views an array that exactly fits it), so
    a batch never keeps, or ships to another process, a whole row group's buffer."""
    if x.flags.c_contiguous and (x.base is None or getattr(x.base, "nbytes", -1) == x.nbytes):
        return x
    return x.copy()


@dataclass(frozen=True)
class Layout:
    """Where each configured column goes in ``Rows``; derived from ``DataConfig``, plus what
    the loader was asked for beyond it (no labels, pass-through columns)."""

    label: str | None  # None: labels are not read (every row gets 0)
    dense: tuple[str, ...]
    keys: list[str]
    slot: dict[str, tuple[str, int]]  # per key: ("scalar", row in ids) or ("jagged", k)
    plain_keys: list[str]  # the unweighted features, in data.sparse order
    weighted_keys: list[str]  # the weighted ones
    scalar: tuple[str, ...]
    jagged: tuple[str, ...]
    weights_of: dict[str, str]
    num_embeddings: dict[str, int]
    hash_seed: int
    log1p: bool
    passthrough: pa.Schema | None = None  # pass-through columns and their (decoded) types
    vocab: dict[str, tuple[np.ndarray, np.ndarray]] | None = None  # data.vocab: column -> (values, ids)

    @property
    def num_dense(self) -> int:
        return len(self.dense)

    @property
    def num_scalar(self) -> int:
        return len(self.scalar)

    @property
    def scalar_weighted(self) -> bool:
        return any(c in self.weights_of for c in self.scalar)

    @property
    def jagged_weighted(self) -> list[bool]:
        return [c in self.weights_of for c in self.jagged]

    @property
    def columns(self) -> list[str]:
        """The Parquet columns read, label first (if read), pass-through ones last; each once."""
        label = [self.label] if self.label is not None else []
        extra = self.passthrough.names if self.passthrough is not None else []
        return list(dict.fromkeys([*label, *self.dense, *self.keys, *self.weights_of.values(), *extra]))

    @staticmethod
    def from_config(cfg: DataConfig, *, labels: bool = True, passthrough: pa.Schema | None = None) -> Layout:
        """``labels=False``: the label column is not read; ``passthrough``: columns carried
        beside the rows, with the types every file has (dictionaries decoded)."""
        scalar = tuple(c for c in cfg.sparse if c not in cfg.multi_hot)
        jagged = tuple(c for c in cfg.sparse if c in cfg.multi_hot)
        slot = {
            c: ("jagged", jagged.index(c)) if c in cfg.multi_hot else ("scalar", scalar.index(c))
            for c in cfg.sparse
        }
        return Layout(
            label=cfg.label if labels else None, dense=tuple(cfg.dense), keys=list(cfg.sparse), slot=slot,
            plain_keys=[c for c in cfg.sparse if c not in cfg.weighted],
            weighted_keys=[c for c in cfg.sparse if c in cfg.weighted],
            scalar=scalar, jagged=jagged, weights_of=dict(cfg.weighted),
            num_embeddings=cfg.table_sizes(), hash_seed=cfg.hash_seed,
            log1p=cfg.dense_transform == "log1p", passthrough=passthrough,
            vocab=data_vocab.load(cfg.vocab) if cfg.vocab else None,
        )


# --------------------------------------------------------------------------- conversion


def _array(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    return arr


_NUMPY_TYPES = {
    pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64,
    pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.uint32(): np.uint32, pa.uint64(): np.uint64,
    pa.float16(): np.float16, pa.float32(): np.float32, pa.float64(): np.float64,
}


def _valid(arr: pa.Array) -> np.ndarray | None:
    """bool ``[n]``, False at nulls; None when there are none (read from the validity bitmap)."""
    if not arr.null_count:
        return None
    bitmap = arr.buffers()[0]
    bits = np.unpackbits(np.frombuffer(bitmap, np.uint8), count=arr.offset + len(arr), bitorder="little")
    return bits[arr.offset :].view(np.bool_)


def _values(arr: pa.Array) -> np.ndarray:
    """The values of a numeric or bool array as numpy, zero-copy where possible; what sits
    at null positions is unspecified (callers mask it with ``_valid``)."""
    n = len(arr)
    if pa.types.is_boolean(arr.type):
        data = arr.buffers()[1]
        bits = np.unpackbits(np.frombuffer(data, np.uint8), count=arr.offset + n, bitorder="little")
        return bits[arr.offset :].view(np.bool_)
    dtype = _NUMPY_TYPES[arr.type]
    if arr.null_count == n:  # all null: the data buffer may be absent
        return np.zeros(n, dtype=dtype)
    data = arr.buffers()[1]
    return np.frombuffer(data, dtype=dtype, count=arr.offset + n)[arr.offset :]


def _raw_ids(arr: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    """Integer or string values -> (int64 bits to hash, valid mask or None)."""
    valid = _valid(arr)
    if is_string(arr.type):
        return hash_strings(arr), valid
    raw = _values(arr)
    # Wider or unsigned types: hash the int64 bits (uint64 above 2**63 wraps, same bits).
    if raw.dtype == np.uint64:
        raw = raw.view(np.int64)
    return raw.astype(np.int64, copy=False), valid


def _labels(arr: pa.Array, where: str, name: str, first_row: int) -> np.ndarray:
    if arr.null_count:
        raise BadRowsError(
            f"{where}: label column {name!r} has {arr.null_count} null values, expected 0 or 1"
        )
    x = _values(arr)
    if x.dtype != np.bool_:
        bad = (x != 0) & (x != 1)
        if bad.any():
            raise BadRowsError(
                f"{where}: label column {name!r} has {int(bad.sum())} values outside {{0, 1}} "
                f"(first in row {first_row + int(np.argmax(bad))}: {x[bad][0].item()!r})"
            )
    return x.astype(np.float32)


def _dense(table: pa.Table, layout: Layout, order: np.ndarray | None) -> np.ndarray:
    # Column by column into a [F_dense, n] buffer (contiguous passes); batches transpose
    # their slice into the row-major [B, F_dense] the model takes.
    out = np.empty((layout.num_dense, table.num_rows), dtype=np.float32)
    scratch = None if order is None else np.empty(table.num_rows, dtype=np.float32)
    for j, name in enumerate(layout.dense):
        arr = _array(table, name)
        row = out[j] if order is None else scratch
        values, valid = _values(arr), _valid(arr)
        np.copyto(row, values, casting="unsafe")
        if pa.types.is_floating(arr.type):
            np.copyto(row, 0.0, where=~np.isfinite(row))  # NaN/inf count as missing
        if valid is not None:
            np.multiply(row, valid, out=row)  # nulls -> 0 (finite here, so 0 * x = 0)
        if layout.log1p:
            np.maximum(row, 0.0, out=row)
            np.log1p(row, out=row)
        if order is not None:  # permuted right away, while the row is still in cache
            np.take(row, order, out=out[j], mode="clip")
    return out


def _jagged(table: pa.Table, name: str, layout: Layout, where: str, first_row: int) -> Jagged:
    arr = _array(table, name)
    lengths = pc.list_value_length(arr)
    if lengths.null_count:
        lengths = pc.fill_null(lengths, 0)
    lengths = lengths.to_numpy().astype(np.int32)
    flat = arr.flatten()  # honours slicing; null lists contribute nothing
    if pa.types.is_dictionary(flat.type):
        flat = flat.cast(flat.type.value_type)
    raw, valid = _raw_ids(flat)
    values = hash_ids(raw, valid, layout.num_embeddings[name], salt=layout.hash_seed)
    weights = None
    if name in layout.weights_of:
        wname = layout.weights_of[name]
        warr = _array(table, wname)
        wlen = pc.fill_null(pc.list_value_length(warr), 0).to_numpy().astype(np.int32)
        if not np.array_equal(wlen, lengths):
            row = int(np.argmax(wlen != lengths))
            raise BadRowsError(
                f"{where}: weights column {wname!r} has {wlen[row]} weights in row {first_row + row} but "
                f"ids column {name!r} has {lengths[row]} ids; expected one weight per id"
            )
        wflat = warr.flatten()
        if wflat.null_count:
            raise BadRowsError(
                f"{where}: weights column {wname!r} has {wflat.null_count} null weights, "
                f"expected a number per id"
            )
        weights = wflat.to_numpy(zero_copy_only=False).astype(np.float32)
    return Jagged(lengths, values, weights)


_GROUPS = 4
"""Column groups converted in parallel when ``convert`` gets a thread pool."""


def _run_all(tasks: list) -> None:
    for task in tasks:
        task()


def convert(
    table: pa.Table,
    layout: Layout,
    where: str,
    order: np.ndarray | None = None,
    pool: Executor | None = None,
    first_row: int = 0,
) -> Rows:
    """One slice of a row group (the configured columns) -> ``Rows``.

    Args:
        table: the rows, read from Parquet.
        layout: ``Layout.from_config(cfg)``.
        where: ``"<file>: row group <i>"`` for error messages.
        order: optional permutation of the rows (int64 ``[n]``); the result is in that
            order. Applied while converting (the gathers run on cache-sized columns), which
            is much cheaper than permuting the converted rows.
        pool: optional thread pool; columns are then converted in parallel (numpy and
            Arrow release the GIL in their loops).
        first_row: row of the row group where ``table`` starts (for error messages).

    Raises:
        BadRowsError: naming ``where``, the column and what was expected.
    """
    n = table.num_rows
    ids = np.empty((layout.num_scalar, n), dtype=np.int64)
    id_weights = np.ones((layout.num_scalar, n), np.float32) if layout.scalar_weighted else None
    out: dict[str, Any] = {}

    def labels_and_dense() -> None:
        if layout.label is None:
            out["labels"] = np.zeros(n, np.float32)
        else:
            labels = _labels(_array(table, layout.label), where, layout.label, first_row)
            out["labels"] = labels if order is None else np.take(labels, order)
        out["dense"] = _dense(table, layout, order)

    def scalar(k: int) -> None:
        name = layout.scalar[k]
        arr = _array(table, name)
        if layout.vocab is not None:
            if is_string(arr.type):
                raise BadRowsError(f"{where}: column {name!r} holds strings; data.vocab maps integer ids "
                                   f"(prepare-criteo's output)")
            raw, valid = _raw_ids(arr)
            mapped = apply_vocab(*layout.vocab[name], raw, valid)
            ids[k] = mapped if order is None else np.take(mapped, order)
        elif order is None:
            raw, valid = _raw_ids(arr)
            hash_ids(raw, valid, layout.num_embeddings[name], salt=layout.hash_seed, out=ids[k])
        else:
            # Hash in file order (streaming reads), then permute the result while it is
            # still in cache; gathering the raw values at random would miss the cache.
            raw, valid = _raw_ids(arr)
            hashed = hash_ids(raw, valid, layout.num_embeddings[name], salt=layout.hash_seed)
            np.take(hashed, order, out=ids[k], mode="clip")
        if name in layout.weights_of:
            warr = _array(table, layout.weights_of[name])
            if warr.null_count:
                raise BadRowsError(
                    f"{where}: weights column {layout.weights_of[name]!r} has "
                    f"{warr.null_count} null weights, expected a number per row"
                )
            w = warr.to_numpy(zero_copy_only=False)
            id_weights[k] = w if order is None else np.take(w, order)

    def jagged(k: int) -> None:
        j = _jagged(table, layout.jagged[k], layout, where, first_row)
        out[("jagged", k)] = j if order is None else j.take(order)

    tasks = [labels_and_dense, *(partial(scalar, k) for k in range(layout.num_scalar)),
             *(partial(jagged, k) for k in range(len(layout.jagged)))]
    if pool is None:
        for task in tasks:
            task()
    else:
        # A few groups of columns rather than one task per column: less scheduling overhead.
        groups = [tasks[i :: _GROUPS] for i in range(_GROUPS)]
        for future in [pool.submit(_run_all, g) for g in groups if g]:
            future.result()  # re-raises a task's error (e.g. bad labels) here
    return Rows(out["labels"], np.ones(n, np.float32), out["dense"], ids, id_weights,
                [out[("jagged", k)] for k in range(len(layout.jagged))],
                _passthrough(table, layout.passthrough, order))


def _passthrough(table: pa.Table, schema: pa.Schema | None, order: np.ndarray | None) -> pa.Table | None:
    """The pass-through columns of ``table`` as they are (dictionaries decoded), in ``order``."""
    if schema is None:
        return None
    columns = []
    for f in schema:
        col = table.column(f.name)
        if pa.types.is_dictionary(col.type):
            col = col.cast(f.type)
        columns.append(col)
    # The one schema (nullable fields, no file metadata) for every file and for padding rows,
    # so that batches can concatenate slices of several row groups.
    out = pa.Table.from_arrays(columns, schema=schema)
    return out if order is None else out.take(order)
