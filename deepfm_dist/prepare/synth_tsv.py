"""Criteo-format TSV with realistic field statistics, for the benchmark and for trying the tool.

Per-column null rates and categorical cardinalities follow the Kaggle Criteo data set;
integers are heavy-tailed counts (I2 also takes -1, -2, -3); categorical values are Zipf
ranks hashed to 32 bits and written as 8 lowercase hex digits. The average line is about
as long as a real one (~240 bytes), so MB/s figures on it transfer to the real files.

Rows are generated and formatted in vectorised batches (pyarrow string kernels), so writing
a GB takes seconds, not the minutes a Python loop over rows would.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Kaggle Criteo statistics (share of empty fields, distinct values per categorical column).
DENSE_NULL = [0.45, 0.0, 0.21, 0.22, 0.026, 0.22, 0.043, 0.0005, 0.043, 0.45, 0.043, 0.76, 0.22]
DENSE_LOG_MEAN = [0.7, 2.5, 2.0, 1.5, 7.5, 3.5, 1.5, 2.3, 3.5, 0.3, 1.0, 0.3, 1.5]
SPARSE_NULL = [0, 0, 0.034, 0.034, 0, 0.12, 0, 0, 0, 0, 0, 0.034, 0, 0, 0, 0.034, 0, 0,
               0.44, 0.44, 0.034, 0.76, 0, 0.034, 0.44, 0.44]  # fmt: skip
SPARSE_CARDINALITY = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683,
                      8351593, 3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15,
                      286181, 105, 142572]  # fmt: skip
I2_NEGATIVE_RATE = 0.03
CTR = 0.256

_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _mix32(x: np.ndarray) -> np.ndarray:
    """A 64-bit multiply-xorshift mixer, top 32 bits: spreads ranks like Criteo's hashes.
    (Local rather than deepfm_dist.data.hashing, whose package import pulls in torch.)"""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(29))) * np.uint64(0xBF58476D1CE4E5B9)
        return (z >> np.uint64(32)).astype(np.uint32)


def _hex8(values: np.ndarray) -> pa.Array:
    """uint32 values -> 8-lowercase-hex-digit strings, vectorised."""
    shifts = np.arange(28, -4, -4, dtype=np.uint32)
    digits = _HEX_DIGITS[(values[:, None].astype(np.uint32) >> shifts) & 0xF]
    offsets = np.arange(0, 8 * (len(values) + 1), 8, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets), pa.py_buffer(digits.tobytes())])


def _with_nulls(strings: pa.Array, null_rate: float, rng: np.random.Generator) -> pa.Array:
    """Empties a ``null_rate`` share of the strings (an empty field is a null)."""
    if null_rate <= 0:
        return strings
    empty = rng.random(len(strings)) < null_rate
    return pc.if_else(pa.array(empty), "", strings)


def tsv_lines(rows: int, rng: np.random.Generator) -> bytes:
    """``rows`` labelled Criteo lines, ``\\n``-terminated."""
    columns = [pa.array((rng.random(rows) < CTR).astype(np.int8)).cast(pa.string())]
    for i in range(13):
        log_counts = np.minimum(rng.exponential(DENSE_LOG_MEAN[i], rows), 20.0)  # cap at ~5e8
        counts = np.floor(np.expm1(log_counts)).astype(np.int64)
        if i == 1:
            negative = rng.random(rows) < I2_NEGATIVE_RATE
            counts[negative] = -rng.integers(1, 4, int(negative.sum()))
        columns.append(_with_nulls(pa.array(counts).cast(pa.string()), DENSE_NULL[i], rng))
    for i in range(26):
        card = SPARSE_CARDINALITY[i]
        # Zipf-like ranks: a power of a uniform concentrates mass on the first ranks.
        ranks = np.floor(card * rng.random(rows) ** 4).astype(np.uint64)
        hashed = _mix32(ranks + np.uint64(1_000_003 * (i + 1)))
        columns.append(_with_nulls(_hex8(hashed), SPARSE_NULL[i], rng))
    lines = pc.binary_join_element_wise(*columns, "\t")
    lines = pc.binary_join_element_wise(lines, "\n", "")
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32, count=rows + 1, offset=lines.offset * 4)
    return lines.buffers()[2].to_pybytes()[offsets[0] : offsets[-1]]


def write_tsv(path: str, size_bytes: int, seed: int = 0, batch_rows: int = 100_000) -> int:
    """Writes at least ``size_bytes`` of Criteo TSV (whole lines) to ``path``; returns rows."""
    batch_rows = max(1, min(batch_rows, size_bytes // 240 + 1))  # no 24 MB batch for a 1 MB file
    rng = np.random.default_rng(seed)
    written = rows = 0
    with open(path, "wb") as f:
        while written < size_bytes:
            data = tsv_lines(batch_rows, rng)
            f.write(data)
            written += len(data)
            rows += batch_rows
    return rows
