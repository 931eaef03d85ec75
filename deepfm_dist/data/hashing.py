"""Mapping raw categorical values to embedding-table rows.

Every sparse column is hashed into a table of ``num_embeddings`` rows:

* row 0 is reserved for null (missing) values, so "missing" gets its own learned
  embedding and never collides with a real value;
* a non-null value ``x`` goes to ``1 + ((h >> 32) * (num_embeddings - 1) >> 32)`` with
  ``h = splitmix64(x ^ mix(salt))``: the high 32 bits of the hash scaled to the table
  (Lemire's multiply-shift range reduction; about twice as fast as ``h % (num_embeddings - 1)``
  and as even: the bias is below ``num_embeddings / 2**32``). Tables of more than ``2**32 + 1``
  rows use ``h % (num_embeddings - 1)``.

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


_SHORT_STRINGS = 24
"""Longest strings hashed by masked passes over all rows (see ``hash_strings``)."""
_BLOCK = 1 << 15
"""Elements hashed per step: the temporaries (2 x 256 KiB) stay in the L2 cache, which makes
the ~13 element-wise passes of the mixer several times faster than on whole columns."""


def hash_ids(
    raw: np.ndarray,
    valid: np.ndarray | None,
    num_embeddings: int,
    salt: int = 0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Maps raw categorical values to embedding rows in ``[0, num_embeddings)``.

    Args:
        raw: integer array ``[N]`` of raw values (int64 bits are hashed; values at null
            positions are ignored).
        valid: bool array ``[N]``, False where the value is null; None means no nulls.
        num_embeddings: rows in the embedding table, at least 2 (row 0 is for nulls).
        salt: changes the value-to-row mapping (e.g. the run's hash seed).
        out: optional int64 array ``[N]`` to write the ids into (e.g. a row of a batch).

    Returns:
        int64 array ``[N]`` (``out`` if given): 0 where ``valid`` is False, else in
        ``[1, num_embeddings)``.
    """
    if num_embeddings < 2:
        raise ValueError(
            f"hash_ids: num_embeddings must be >= 2 (row 0 is reserved for nulls), "
            f"got {num_embeddings}"
        )
    raw = np.asarray(raw)
    if not np.issubdtype(raw.dtype, np.integer):
        raise TypeError(f"hash_ids: raw must be an integer array, got dtype {raw.dtype}")
    raw = raw.reshape(-1)
    bits = raw.astype(np.int64, copy=False).view(np.uint64)
    if valid is not None:
        valid = np.asarray(valid, dtype=bool).reshape(-1)
        if valid.shape != raw.shape:
            raise ValueError(
                f"hash_ids: valid has shape {valid.shape}, expected raw's shape {raw.shape}"
            )
    n = raw.size
    if out is None:
        out = np.empty(n, dtype=np.int64)
    elif out.shape != (n,) or out.dtype != np.int64:
        raise ValueError(f"hash_ids: out must be int64 of shape ({n},), got {out.dtype} {out.shape}")
    # ``1 + reduce(splitmix64(bits ^ salt), num_embeddings - 1)`` (see the module docstring),
    # done in place on cache-sized blocks (no temporaries the size of the column).
    salt_bits = _salt_mix(salt)
    rows = np.uint64(num_embeddings - 1)
    z = np.empty(min(n, _BLOCK), dtype=np.uint64)
    t = np.empty_like(z)
    s30, s27, s31, s32 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(32)
    lemire = num_embeddings - 1 <= 1 << 32
    with np.errstate(over="ignore"):
        for lo in range(0, n, _BLOCK):
            hi = min(n, lo + _BLOCK)
            zz, tt = z[: hi - lo], t[: hi - lo]
            np.bitwise_xor(bits[lo:hi], salt_bits, out=zz)
            np.add(zz, _GOLDEN, out=zz)
            np.right_shift(zz, s30, out=tt)
            np.bitwise_xor(zz, tt, out=zz)
            np.multiply(zz, _MUL1, out=zz)
            np.right_shift(zz, s27, out=tt)
            np.bitwise_xor(zz, tt, out=zz)
            np.multiply(zz, _MUL2, out=zz)
            np.right_shift(zz, s31, out=tt)
            np.bitwise_xor(zz, tt, out=zz)
            if lemire:
                # High 32 bits times the table size, high half: floor(h / 2**32 * rows), a
                # multiply-shift in place of a 64-bit division (bias < rows / 2**32).
                np.right_shift(zz, s32, out=zz)
                np.multiply(zz, rows, out=zz)
                np.right_shift(zz, s32, out=zz)
            else:
                np.remainder(zz, rows, out=zz)
            ids = out[lo:hi]
            np.add(zz.view(np.int64), 1, out=ids)
            if valid is not None:
                np.multiply(ids, valid[lo:hi], out=ids)
    return out


def hash_strings(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Stable 64-bit FNV-1a hash of each string's UTF-8 bytes.

    Vectorised over rows; the Python loop runs over byte positions (the longest string's
    length), never over rows. Strings up to ``_SHORT_STRINGS`` bytes: a masked update of all
    rows per position. Longer ones: rows are sorted by byte length (longest first), so at
    byte position k the rows still being hashed are a prefix of that order.

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

    max_len = int(lengths.max())
    with np.errstate(over="ignore"):
        if max_len <= _SHORT_STRINGS:
            # Short strings (Criteo's are 8 hex digits): one masked pass per byte position
            # over all rows is cheaper than sorting the rows by length.
            last = max(data.size - 1, 0)
            for k in range(max_len):
                live = lengths > k
                byte = data[np.minimum(starts + k, last)].astype(np.uint64) if data.size else 0
                np.copyto(out, (out ^ byte) * _FNV_PRIME, where=live)
        else:
            order = np.argsort(-lengths, kind="stable")
            sorted_lengths = lengths[order]
            sorted_starts = starts[order]
            h = out[order]
            # active[k] = number of rows longer than k = size of the prefix still hashed.
            active = np.searchsorted(-sorted_lengths, -np.arange(max_len), side="left")
            for k in range(max_len):
                m = int(active[k])
                byte = data[sorted_starts[:m] + k].astype(np.uint64)
                h[:m] = (h[:m] ^ byte) * _FNV_PRIME
            out[order] = h
    if arr.null_count:
        out[~arr.is_valid().to_numpy(zero_copy_only=False)] = 0
    return out.view(np.int64)
