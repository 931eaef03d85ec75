"""Parquet reader that yields ``Batch``es, each rank reading only its share of the rows.

Work split: the row groups of all files, in sorted file order, form one global sequence of
``N`` rows; rank ``r`` of ``W`` owns the contiguous rows ``[r*N//W, (r+1)*N//W)`` (shares
differ by at most one row) and reads only the row groups that overlap them.

Every rank yields the SAME number of batches: sharded embedding lookups are collectives,
so a rank with one batch fewer would leave the others waiting forever.

* ``pad_last=False`` (training): ``(N // W) // batch_size`` full batches per rank; the rows
  beyond that (fewer than ``batch_size`` per rank, plus the one extra row some ranks own)
  are not read this epoch.
* ``pad_last=True`` (evaluation): ``ceil(ceil(N / W) / batch_size)`` batches per rank, all of
  exactly ``batch_size`` rows; the missing rows are padding (dense 0, sparse id 0, label 0,
  weight 0.0). Every real row is scored exactly once over all ranks.

Memory is bounded by one row group plus one batch: row groups are read one at a time,
only the needed columns.

Conversion (vectorised per row group):
* label -> float32; values must be 0/1 (null or other values are an error).
* dense -> float32 ``log1p(max(x, 0))``; null and non-finite values -> 0. Counts are
  heavy-tailed, so log1p keeps them in a range the MLP trains on; negative values (Criteo's
  I2 has -1..-3) are clipped to 0, as are nulls: "no count" and "zero count" coincide.
* sparse -> one id per row in ``[0, num_embeddings[col])`` via ``hash_ids`` (id 0 = null);
  string columns are first hashed with ``hash_strings``.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from deepfm_dist.data.batch import Batch
from deepfm_dist.data.hashing import hash_ids, hash_strings

_GLOB_CHARS = set("*?[")


def resolve_parquet_paths(
    spec: str | os.PathLike | Sequence[str | os.PathLike], what: str
) -> list[str]:
    """Expands a path spec into the sorted list of Parquet files it names.

    Args:
        spec: a file, a directory (every ``*.parquet`` below it, skipping names that start
            with ``.`` or ``_``, i.e. hidden/temporary files and Spark/Hive markers), a glob
            (``**`` allowed), or a list of those.
        what: what the spec is for, e.g. ``"data.train"``; used in error messages.

    Returns:
        Sorted, de-duplicated absolute paths.

    Raises:
        FileNotFoundError: the spec, or any one entry of a list, matches no Parquet file.
    """
    single = isinstance(spec, (str, os.PathLike))
    items = [spec] if single else list(spec)
    if not items:
        raise FileNotFoundError(f"{what}: empty path list matched no Parquet file")
    found: set[str] = set()
    for item in items:
        item = os.fspath(item)
        matches: list[str] = []
        if os.path.isdir(item):
            matches = _parquet_files_below(item)
        elif os.path.isfile(item):
            matches = [item]
        elif _GLOB_CHARS & set(item):
            for match in glob.glob(item, recursive=True):
                if os.path.isdir(match):
                    matches += _parquet_files_below(match)
                elif os.path.isfile(match):
                    matches.append(match)
        if not matches:
            where = f"{item!r}" if single else f"{item!r} (in {items!r})"
            raise FileNotFoundError(f"{what}: {where} matched no Parquet file")
        found.update(os.path.abspath(m) for m in matches)
    return sorted(found)


def _parquet_files_below(directory: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
        out += [
            os.path.join(root, f)
            for f in files
            if f.endswith(".parquet") and not f.startswith((".", "_"))
        ]
    return out


@dataclass(frozen=True)
class _Piece:
    """Rows ``[start, stop)`` of row group ``row_group`` of file ``file``."""

    file: int
    row_group: int
    start: int
    stop: int


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


_EXPECTED = {
    "label": ("integer or bool", lambda t: pa.types.is_integer(t) or pa.types.is_boolean(t)),
    "dense": ("integer or floating", lambda t: pa.types.is_integer(t) or pa.types.is_floating(t)),
    "sparse": ("integer or string", lambda t: pa.types.is_integer(t) or _is_string(t)),
}


class ParquetBatchReader:
    """Streams this rank's share of Parquet rows as fixed-size ``Batch``es.

    Args:
        paths: Parquet files (see ``resolve_parquet_paths``); their order is the row order.
        label: label column name.
        dense: dense column names, in the order of ``Batch.dense_features`` columns.
        sparse: sparse column names, the KeyedJaggedTensor keys in this order.
        num_embeddings: table rows per sparse column (>= 2; row 0 is for nulls).
        batch_size: rows per batch ``B`` on this rank.
        rank, world_size: this rank and the number of ranks.
        pad_last: see the module docstring: False drops the tail (training), True pads it
            with weight-0 rows (evaluation).
        hash_seed: salt of the id hashing; must be the same on every rank and between
            training and evaluation.
        pin_memory: pin batch tensors (for asynchronous copies to a GPU).

    Only Parquet footers are read here: a missing column, a wrong type, an unreadable file
    or an empty data set fail now, identically on every rank.
    """

    def __init__(
        self,
        paths: list[str],
        *,
        label: str,
        dense: list[str],
        sparse: list[str],
        num_embeddings: dict[str, int],
        batch_size: int,
        rank: int,
        world_size: int,
        pad_last: bool,
        hash_seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if not paths:
            raise ValueError("ParquetBatchReader: paths is empty, expected at least one file")
        if batch_size < 1:
            raise ValueError(f"ParquetBatchReader: batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"ParquetBatchReader: need 0 <= rank < world_size, got rank={rank}, "
                f"world_size={world_size}"
            )
        columns = [label, *dense, *sparse]
        duplicates = sorted({c for c in columns if columns.count(c) > 1})
        if duplicates:
            raise ValueError(
                f"ParquetBatchReader: columns {duplicates} are used more than once among "
                f"label={label!r}, dense={dense}, sparse={sparse}"
            )
        for col in sparse:
            if col not in num_embeddings:
                raise ValueError(
                    f"ParquetBatchReader: num_embeddings has no entry for sparse column "
                    f"{col!r} (has {sorted(num_embeddings)})"
                )
            if num_embeddings[col] < 2:
                raise ValueError(
                    f"ParquetBatchReader: num_embeddings[{col!r}] must be >= 2 (row 0 is "
                    f"reserved for nulls), got {num_embeddings[col]}"
                )

        self.paths = list(paths)
        self.label = label
        self.dense = list(dense)
        self.sparse = list(sparse)
        self.num_embeddings = {c: int(num_embeddings[c]) for c in sparse}
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.pad_last = pad_last
        self.hash_seed = hash_seed
        self.pin_memory = pin_memory
        self._columns = columns

        # Per row group (in global order): file index, row group index, row count.
        groups: list[tuple[int, int, int]] = []
        for file_idx, path in enumerate(self.paths):
            try:
                with pq.ParquetFile(path) as pf:
                    schema = pf.schema_arrow
                    metadata = pf.metadata
            except (OSError, pa.ArrowException) as e:
                raise ValueError(f"{path}: not a readable Parquet file ({e})") from e
            self._validate_schema(path, schema)
            groups += [
                (file_idx, i, metadata.row_group(i).num_rows)
                for i in range(metadata.num_row_groups)
            ]

        self.num_rows = sum(n for _, _, n in groups)
        """Rows over all files."""
        if self.num_rows == 0:
            raise ValueError(f"ParquetBatchReader: the files hold 0 rows: {self.paths}")

        n, w, b = self.num_rows, world_size, batch_size
        if pad_last:
            self._num_batches = math.ceil(math.ceil(n / w) / b)
        else:
            self._num_batches = (n // w) // b
        start, stop = rank * n // w, (rank + 1) * n // w
        if not pad_last:
            stop = start + self._num_batches * b  # do not even read the dropped tail
        self.rank_rows = stop - start
        """Real (weight 1) rows this rank yields per epoch."""

        self._pieces: list[_Piece] = []
        group_start = 0
        for file_idx, rg, rows in groups:
            lo, hi = max(start, group_start), min(stop, group_start + rows)
            if lo < hi:
                self._pieces.append(_Piece(file_idx, rg, lo - group_start, hi - group_start))
            group_start += rows

    def _validate_schema(self, path: str, schema: pa.Schema) -> None:
        for kind, cols in (("label", [self.label]), ("dense", self.dense), ("sparse", self.sparse)):
            expected, accepts = _EXPECTED[kind]
            for col in cols:
                idx = schema.get_all_field_indices(col)
                if not idx:
                    raise ValueError(
                        f"{path}: missing {kind} column {col!r} (file has {schema.names})"
                    )
                if len(idx) > 1:
                    raise ValueError(f"{path}: {kind} column {col!r} appears {len(idx)} times")
                found = schema.field(idx[0]).type
                value_type = found.value_type if pa.types.is_dictionary(found) else found
                if not accepts(value_type):
                    raise ValueError(
                        f"{path}: {kind} column {col!r} has type {found}, expected {expected}"
                    )

    # Resume support: this reader never shuffles, so a position is (epoch, batches consumed)
    # and resuming replays the epoch's first batches without yielding them.
    _epoch: int = 0
    _consumed: int = 0
    _skip: int = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def state_dict(self) -> dict:
        """Position after the batches yielded so far in this epoch."""
        return {"epoch": self._epoch, "batches": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        """The next ``iter()`` starts right after ``state['batches']`` batches of that epoch."""
        self._epoch, self._skip = int(state["epoch"]), int(state["batches"])

    def __iter__(self) -> Iterator[Batch]:
        skip, self._skip = self._skip, 0
        self._consumed = skip
        for i, batch in enumerate(self._iter_all()):
            if i < skip:
                continue
            self._consumed = i + 1
            yield batch

    def __len__(self) -> int:
        """Batches per epoch; identical on every rank."""
        return self._num_batches

    def _iter_all(self) -> Iterator[Batch]:
        b = self.batch_size
        emitted = 0
        carry: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        open_file: tuple[int, pq.ParquetFile] | None = None
        try:
            for piece in self._pieces:
                if open_file is None or open_file[0] != piece.file:
                    if open_file is not None:
                        open_file[1].close()
                    open_file = (piece.file, pq.ParquetFile(self.paths[piece.file]))
                path = self.paths[piece.file]
                try:
                    table = open_file[1].read_row_group(piece.row_group, columns=self._columns)
                except (OSError, pa.ArrowException) as e:
                    raise ValueError(
                        f"{path}: failed to read row group {piece.row_group} ({e})"
                    ) from e
                if table.num_rows < piece.stop:
                    raise ValueError(
                        f"{path}: row group {piece.row_group} has {table.num_rows} rows, "
                        f"its footer promised at least {piece.stop}"
                    )
                table = table.slice(piece.start, piece.stop - piece.start)
                labels, dense, ids = self._convert(table, path, piece.row_group)
                if carry is not None:  # fewer than batch_size rows left from the last group
                    labels = np.concatenate([carry[0], labels])
                    dense = np.concatenate([carry[1], dense])
                    ids = np.concatenate([carry[2], ids], axis=1)
                rows = labels.shape[0]
                full = rows // b
                for i in range(full):
                    yield self._batch(labels[i * b : (i + 1) * b], dense[i * b : (i + 1) * b],
                                      ids[:, i * b : (i + 1) * b], real=b)
                emitted += full
                tail = full * b
                carry = (labels[tail:], dense[tail:], ids[:, tail:])
        finally:
            if open_file is not None:
                open_file[1].close()

        if not self.pad_last:
            # rank_rows is a multiple of batch_size: nothing is left over.
            assert emitted == self._num_batches and (carry is None or carry[0].size == 0)
            return
        # Padding: the carry (fewer than b rows) is completed, then whole padding batches.
        while emitted < self._num_batches:
            real = 0 if carry is None else carry[0].shape[0]
            labels = np.zeros(b, dtype=np.float32)
            dense = np.zeros((b, len(self.dense)), dtype=np.float32)
            ids = np.zeros((len(self.sparse), b), dtype=np.int64)
            if real:
                labels[:real], dense[:real], ids[:, :real] = carry
            carry = None
            yield self._batch(labels, dense, ids, real=real)
            emitted += 1

    def _convert(
        self, table: pa.Table, path: str, row_group: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A slice of one row group, ``n`` rows -> labels ``[n]``, dense ``[n, F_dense]``
        and ids ``[F_sparse, n]`` (key-major, ready for the KeyedJaggedTensor)."""
        n = table.num_rows
        label_col = _decode(table.column(self.label))
        if label_col.null_count:
            raise ValueError(
                f"{path}: row group {row_group}: label column {self.label!r} has "
                f"{label_col.null_count} null values, expected 0/1 labels"
            )
        labels = label_col.to_numpy()
        bad = (labels != 0) & (labels != 1)
        if bad.any():
            raise ValueError(
                f"{path}: row group {row_group}: label column {self.label!r} has "
                f"{int(bad.sum())} values outside {{0, 1}} (e.g. {labels[bad][0]!r})"
            )
        labels = labels.astype(np.float32)

        dense = np.empty((n, len(self.dense)), dtype=np.float32)
        for j, col in enumerate(self.dense):
            x = _decode(table.column(col))
            values = x.fill_null(0).to_numpy().astype(np.float32)
            if pa.types.is_floating(x.type):
                values[~np.isfinite(values)] = 0.0  # NaN/inf count as missing
            np.log1p(np.maximum(values, 0.0), out=dense[:, j])

        ids = np.empty((len(self.sparse), n), dtype=np.int64)
        for j, col in enumerate(self.sparse):
            x = _decode(table.column(col))
            valid = x.is_valid().to_numpy(zero_copy_only=False) if x.null_count else None
            if _is_string(x.type):
                raw = hash_strings(x)
            else:
                # uint64 values above 2**63 wrap to negative int64: same bits, same hash.
                raw = x.fill_null(0).cast(pa.int64(), safe=False).to_numpy()
            ids[j] = hash_ids(raw, valid, self.num_embeddings[col], salt=self.hash_seed)
        return labels, dense, ids

    def _batch(self, labels: np.ndarray, dense: np.ndarray, ids: np.ndarray, real: int) -> Batch:
        """labels ``[B]``, dense ``[B, F_dense]``, ids ``[F_sparse, B]`` -> Batch; the first
        ``real`` rows get weight 1, the rest 0."""
        b = labels.shape[0]
        weights = torch.zeros(b, dtype=torch.float32)
        weights[:real] = 1.0
        sparse = KeyedJaggedTensor.from_lengths_sync(
            keys=self.sparse,
            # Key-major: all rows of key 0, then all rows of key 1, ...
            values=torch.from_numpy(np.ascontiguousarray(ids).reshape(-1)),
            # int32 lengths like torchrec's own Criteo/random data sets.
            lengths=torch.ones(len(self.sparse) * b, dtype=torch.int32),
        )
        batch = Batch(
            dense_features=torch.from_numpy(np.ascontiguousarray(dense)),
            sparse_features=sparse,
            labels=torch.from_numpy(np.ascontiguousarray(labels)),
            weights=weights,
        )
        return batch.pin_memory() if self.pin_memory else batch


def _decode(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Dictionary-encoded columns (e.g. pandas categoricals) -> plain values."""
    if pa.types.is_dictionary(column.type):
        return column.cast(column.type.value_type)
    return column
