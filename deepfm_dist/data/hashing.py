"""Mapping raw categorical values to embedding-table rows.

Every sparse column is hashed into a table of ``num_embeddings`` rows:

* row 0 is reserved for null (missing) values, so "missing" gets its own learned
  embedding and never collides with a real value;
* a non-null value ``x`` goes to ``1 + splitmix64(x ^ mix(salt)) % (num_embeddings - 1)``.

Why a hash and not a bare ``x % num_embeddings``: raw Criteo values are already 32-bit
hashes, so a modulo would spread them well, but ids in other data sets are often
sequential (0, 1, 2, ...) or share low bits (multiples of 2^k, timestamps, ...). A modulo
then piles them onto a few rows. splitmix64 is a cheap bijective 64-bit mixer whose output
bits all depend on all input bits, so any input distribution is spread evenly.

Everything here is vectorised numpy on ``uint64`` arrays, whose arithmetic wraps modulo
2^64 (the wrap-around is the point of the mixer, not an error), and deterministic across
processes, runs and machines: no Python ``hash()``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (Steele et al. 2014), applied element-wise.

    Args:
        x: integer array of any shape; int64 values are reinterpreted as their uint64 bits.

    Returns:
        uint64 array of the same shape.
    """
    z = np.asarray(x)
    if z.dtype != np.uint64:
        # Reinterpret the bits rather than convert values: -1 must map like 2**64 - 1.
        z = z.astype(np.int64, copy=False).view(np.uint64)
    # Array arithmetic on uint64 wraps modulo 2**64; errstate keeps numpy quiet should it
    # ever warn on the (intended) overflow.
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MUL1
        z = (z ^ (z >> np.uint64(27))) * _MUL2
        return z ^ (z >> np.uint64(31))


def _salt_mix(salt: int) -> np.uint64:
    """Spreads a small salt (0, 1, 2, ...) over all 64 bits before it is xor-ed in."""
    return splitmix64(np.array([salt & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]


def hash_ids(
    raw: np.ndarray, valid: np.ndarray | None, num_embeddings: int, salt: int = 0
) -> np.ndarray:
    """Maps raw categorical values to embedding rows in ``[0, num_embeddings)``.

    Args:
        raw: integer array ``[N]`` of raw values (int64 bits are hashed; values at null
            positions are ignored).
        valid: bool array ``[N]``, False where the value is null; None means no nulls.
        num_embeddings: rows in the embedding table, at least 2 (row 0 is for nulls).
        salt: changes the value-to-row mapping (e.g. the run's hash seed).

    Returns:
        int64 array ``[N]``: 0 where ``valid`` is False, else in ``[1, num_embeddings)``.
    """
    if num_embeddings < 2:
        raise ValueError(
            f"hash_ids: num_embeddings must be >= 2 (row 0 is reserved for nulls), "
            f"got {num_embeddings}"
        )
    raw = np.asarray(raw)
    if not np.issubdtype(raw.dtype, np.integer):
        raise TypeError(f"hash_ids: raw must be an integer array, got dtype {raw.dtype}")
    bits = raw.astype(np.int64, copy=False).view(np.uint64)
    mixed = splitmix64(bits ^ _salt_mix(salt))
    ids = (mixed % np.uint64(num_embeddings - 1)).astype(np.int64) + 1
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != raw.shape:
            raise ValueError(
                f"hash_ids: valid has shape {valid.shape}, expected raw's shape {raw.shape}"
            )
        ids[~valid] = 0
    return ids


def hash_strings(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Stable 64-bit FNV-1a hash of each string's UTF-8 bytes.

    Vectorised over rows: rows are sorted by byte length (longest first), so at byte
    position k the rows still being hashed are a prefix of that order; the Python loop
    runs over byte positions (the longest string's length), never over rows.

    Args:
        arr: pyarrow string / large_string array (chunked or not; dictionary-encoded
            strings are decoded first).

    Returns:
        int64 array ``[N]`` (the uint64 hash bits); 0 at null positions (callers mask
        nulls anyway, see ``hash_ids``).
    """
    if isinstance(arr, pa.ChunkedArray):
        if arr.num_chunks == 1:
            arr = arr.chunk(0)
        else:
            arr = arr.combine_chunks() if arr.num_chunks else pa.array([], arr.type)
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if pa.types.is_string_view(arr.type) or pa.types.is_binary_view(arr.type):
        arr = arr.cast(pa.large_string())
    if pa.types.is_string(arr.type) or pa.types.is_binary(arr.type):
        offset_dtype = np.int32
    elif pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type):
        offset_dtype = np.int64
    else:
        raise TypeError(f"hash_strings: expected a string array, got type {arr.type}")

    n = len(arr)
    out = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    if n == 0:
        return out.view(np.int64)
    _, offsets_buf, data_buf = arr.buffers()
    # arr.offset: a sliced array's first row sits arr.offset entries into the offsets.
    offsets = np.frombuffer(offsets_buf, dtype=offset_dtype, count=arr.offset + n + 1)
    offsets = offsets[arr.offset :].astype(np.int64)
    data = (
        np.frombuffer(data_buf, dtype=np.uint8)
        if data_buf is not None
        else np.zeros(0, dtype=np.uint8)
    )
    starts = offsets[:-1]
    lengths = offsets[1:] - starts

    order = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[order]
    sorted_starts = starts[order]
    h = out[order]
    max_len = int(sorted_lengths[0])
    # active[k] = number of rows longer than k = size of the prefix still being hashed.
    active = np.searchsorted(-sorted_lengths, -np.arange(max_len), side="left")
    with np.errstate(over="ignore"):
        for k in range(max_len):
            m = int(active[k])
            byte = data[sorted_starts[:m] + k].astype(np.uint64)
            h[:m] = (h[:m] ^ byte) * _FNV_PRIME
    out[order] = h
    if arr.null_count:
        out[~arr.is_valid().to_numpy(zero_copy_only=False)] = 0
    return out.view(np.int64)
