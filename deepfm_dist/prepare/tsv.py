"""Criteo TSV lines -> Arrow tables, vectorised, with exact line/field errors.

A *block* is a run of whole lines, each ending in ``\\n`` (``\\r\\n`` is accepted too). Blocks
are parsed by ``pyarrow.csv`` with explicit column types; categorical columns are read as
bytes and hex-decoded in numpy. Everything a line must satisfy is checked on the whole
block at once; only when a block fails a check is it scanned line by line in Python to
find which lines are bad and why (``find_bad_lines``). Bad lines are rare, so the slow scan
costs nothing in practice, and both paths accept exactly the same lines:

* label (labelled layout only): exactly ``0`` or ``1``;
* ``I1..I13``: empty (null) or ``-?[0-9]+`` within int64;
* ``C1..C26``: empty (null) or exactly 8 hex digits (either case), stored as the unsigned
  32-bit value of the hex (``"0000000a"`` -> 10, ``"ffffffff"`` -> 4294967295) in int64;
* 40 tab-separated fields (label + 13 + 26), or 39 in the unlabelled layout (Criteo's
  test files), whose ``label`` column is written as all-null.

Why the pre-checks before ``pyarrow.csv``: its int64 parser also takes ``" 5"``, ``"5 "`` and
``"0x10"``, its int8 parser ``"00"`` for a label, it skips empty lines and it splits lines
on a lone ``\\r``. Restricting the block's byte set (``_ALLOWED``), requiring every ``\\r`` to
be part of ``\\r\\n`` and comparing the row count with the newline count rule all of that
out, so a value is never silently read differently from what the file says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

LABEL = "label"
DENSE = [f"I{i}" for i in range(1, 14)]
SPARSE = [f"C{i}" for i in range(1, 27)]
COLUMNS = [LABEL, *DENSE, *SPARSE]

SCHEMA = pa.schema(
    [pa.field(LABEL, pa.int8())]
    + [pa.field(c, pa.int64()) for c in DENSE]
    + [pa.field(c, pa.int64()) for c in SPARSE]
)
"""Output schema. All columns are nullable; ``label`` is null only for unlabelled input."""

LABELLED_FIELDS = len(COLUMNS)  # 40
UNLABELLED_FIELDS = LABELLED_FIELDS - 1  # 39

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_ALLOWED = b"0123456789abcdefABCDEF-\t\r\n"
"""Every byte of a valid line is one of these."""

_HEX_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _ch in enumerate(b"0123456789abcdef"):
    _HEX_LUT[_ch] = _i
for _i, _ch in enumerate(b"ABCDEF"):
    _HEX_LUT[_ch] = 10 + _i

_INT_RE = re.compile(rb"-?[0-9]+")
_HEX_RE = re.compile(rb"[0-9a-fA-F]{8}")
# Accepts a good line in one C-level match; lines it rejects go to ``diagnose`` (which
# also accepts integers longer than 18 digits if they fit int64).
_INT_FIELD = rb"\t(?:-?[0-9]{1,18})?"
_HEX_FIELD = rb"\t(?:[0-9a-fA-F]{8})?"
_LINE_RE = {
    True: re.compile(rb"[01]" + _INT_FIELD * 13 + _HEX_FIELD * 26 + rb"\r?"),
    False: re.compile(_INT_FIELD[2:] + _INT_FIELD * 12 + _HEX_FIELD * 26 + rb"\r?"),
}


def field_names(has_label: bool) -> list[str]:
    """Column names of the fields of a line, in file order."""
    return COLUMNS if has_label else COLUMNS[1:]


def layout_name(has_label: bool) -> str:
    if has_label:
        return f"{LABELLED_FIELDS} fields: label, I1..I13, C1..C26"
    return f"{UNLABELLED_FIELDS} fields, no label: I1..I13, C1..C26"


@dataclass(frozen=True)
class BadLine:
    """A line that breaks the format: its 0-based index within the block, and why."""

    line: int
    reason: str


def _show(field: bytes, limit: int = 40) -> str:
    text = field.decode("utf-8", "backslashreplace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def diagnose(line: bytes, has_label: bool) -> str | None:
    """Why ``line`` (without its ``\\n``) is not a valid Criteo line; None when it is."""
    if line.endswith(b"\r"):
        line = line[:-1]
    fields = line.split(b"\t")
    expected = LABELLED_FIELDS if has_label else UNLABELLED_FIELDS
    if len(fields) != expected:
        what = "an empty line" if line == b"" else f"{len(fields)}"
        hint = ""
        other = UNLABELLED_FIELDS if has_label else LABELLED_FIELDS
        if len(fields) == other:
            hint = f" (that is the {'unlabelled' if has_label else 'labelled'} layout; every input must use the same one)"
        return f"expected {layout_name(has_label)}; got {what}{hint}"
    names = field_names(has_label)
    for k, (name, value) in enumerate(zip(names, fields), start=1):
        where = f"field {k} ({name})"
        if name == LABEL:
            if value not in (b"0", b"1"):
                return f"{where}: expected 0 or 1, got {_show(value)}"
        elif name[0] == "I":
            if value and not (_INT_RE.fullmatch(value) and _INT64_MIN <= int(value) <= _INT64_MAX):
                return f"{where}: expected an integer (int64) or empty, got {_show(value)}"
        elif value and not _HEX_RE.fullmatch(value):
            return f"{where}: expected 8 hex digits or empty, got {_show(value)}"
    return None


def find_bad_lines(block: bytes, has_label: bool) -> list[BadLine]:
    """The slow exact scan: every bad line of ``block`` with its reason."""
    lines = block.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the block's final newline ends the last line, it does not start one
    line_re = _LINE_RE[has_label]
    bad = []
    for i, line in enumerate(lines):
        if line_re.fullmatch(line) is None:
            reason = diagnose(line, has_label)
            if reason is not None:
                bad.append(BadLine(i, reason))
    return bad


def drop_lines(block: bytes, drop: list[int]) -> bytes:
    """``block`` without the lines whose 0-based indices are in ``drop``."""
    lines = block.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    skip = set(drop)
    kept = [line for i, line in enumerate(lines) if i not in skip]
    return b"\n".join(kept) + b"\n" if kept else b""


def _read_options(has_label: bool) -> pacsv.ReadOptions:
    # use_threads=False: parallelism comes from worker processes, one core each.
    # block_size: 1 MiB parser blocks stay in cache, which parses much faster than one block
    # for a whole 16 MiB buffer. Each column then comes back in ~1 MiB chunks.
    return pacsv.ReadOptions(column_names=field_names(has_label), use_threads=False, block_size=1 << 20)


_PARSE_OPTIONS = pacsv.ParseOptions(
    delimiter="\t",
    quote_char=False,
    double_quote=False,
    escape_char=False,
    newlines_in_values=False,
    ignore_empty_lines=True,  # an empty line then shows up as a row-count mismatch
)


def _convert_options(has_label: bool) -> pacsv.ConvertOptions:
    types = {c: pa.int64() for c in DENSE}
    types.update({c: pa.binary() for c in SPARSE})
    if has_label:
        types[LABEL] = pa.binary()
    return pacsv.ConvertOptions(
        column_types=types,
        null_values=[""],  # only an empty field is null; "NA", "null", ... are errors
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
    )


_READ = {True: _read_options(True), False: _read_options(False)}
_CONVERT = {True: _convert_options(True), False: _convert_options(False)}


def _offsets(arr: pa.Array) -> np.ndarray:
    return np.frombuffer(arr.buffers()[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)


def _decode_label(arr: pa.Array) -> pa.Array | None:
    """Binary '0'/'1' -> int8; None if any value is something else (or null)."""
    if arr.null_count:
        return None
    offsets = _offsets(arr)
    if offsets[-1] - offsets[0] != len(arr):  # every value exactly one byte
        return None
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    values = data.astype(np.int8) - 48
    if values.size and (values.min() < 0 or values.max() > 1):
        return None
    return pa.array(values, type=pa.int8())


def _decode_hex(arr: pa.Array) -> pa.Array | None:
    """Binary 8-hex-digit values (nulls allowed) -> int64; None if any value is not that."""
    n = len(arr)
    offsets = _offsets(arr)
    lengths = np.diff(offsets)
    valid = lengths != 0  # "" was read as null, so length 0 <=> null
    n_valid = int(np.count_nonzero(valid))
    if int(offsets[-1] - offsets[0]) != 8 * n_valid or not np.all(lengths[valid] == 8):
        return None
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    nibbles = _HEX_LUT[data]
    if nibbles.size and nibbles.max() > 15:
        return None
    nibbles = nibbles.reshape(-1, 8)
    packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]  # [n_valid, 4] bytes, big-endian
    decoded = packed.view(">u4").reshape(-1).astype(np.int64)
    if n_valid == n:
        return pa.array(decoded, type=pa.int64())
    values = np.zeros(n, dtype=np.int64)
    values[valid] = decoded
    if arr.offset == 0 and arr.buffers()[0] is not None:
        # Reuse the parser's validity bitmap instead of re-packing ~valid.
        return pa.Array.from_buffers(
            pa.int64(), n, [arr.buffers()[0], pa.py_buffer(values)], null_count=n - n_valid
        )
    return pa.array(values, mask=~valid, type=pa.int64())


def _decode_chunks(col: pa.ChunkedArray, decode) -> pa.ChunkedArray | None:
    chunks = []
    for chunk in col.chunks:
        decoded = decode(chunk)
        if decoded is None:
            return None
        chunks.append(decoded)
    return pa.chunked_array(chunks, type=decode.type)


_decode_label.type = pa.int8()  # type: ignore[attr-defined]
_decode_hex.type = pa.int64()  # type: ignore[attr-defined]


def parse_fast(block: bytes, has_label: bool) -> pa.Table | None:
    """Vectorised parse of a block; None if ANY line is bad (then use ``find_bad_lines``).

    Returns a table with ``SCHEMA`` and one row per line of the block.
    """
    if not block:
        return SCHEMA.empty_table()
    if block.translate(None, _ALLOWED):
        return None
    if b"\r" in block and block.count(b"\r") != block.count(b"\r\n"):
        return None
    n_lines = block.count(b"\n")
    try:
        table = pacsv.read_csv(
            pa.py_buffer(block),
            read_options=_READ[has_label],
            parse_options=_PARSE_OPTIONS,
            convert_options=_CONVERT[has_label],
        )
    except pa.ArrowInvalid:
        return None
    if table.num_rows != n_lines:
        return None
    columns: list[pa.Array | pa.ChunkedArray] = []
    if has_label:
        label = _decode_chunks(table.column(LABEL), _decode_label)
        if label is None:
            return None
        columns.append(label)
    else:
        columns.append(pa.nulls(n_lines, pa.int8()))
    columns += [table.column(c) for c in DENSE]
    for c in SPARSE:
        decoded = _decode_chunks(table.column(c), _decode_hex)
        if decoded is None:
            return None
        columns.append(decoded)
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def parse_block(block: bytes, has_label: bool, stop_at_first: bool) -> tuple[pa.Table, np.ndarray | None, list[BadLine]]:
    """Parses a block, separating out bad lines.

    Args:
        block: whole lines, each ending in ``\\n``.
        has_label: the labelled (40-field) or unlabelled (39-field) layout.
        stop_at_first: the caller will fail on the first bad line, so do not parse the rest.

    Returns:
        ``(table, lines, bad)``: the rows of the good lines; ``lines`` the 0-based line index
        within the block of each row (None when every line is good, i.e. row i is line i);
        and the bad lines in order.
    """
    table = parse_fast(block, has_label)
    if table is not None:
        return table, None, []
    bad = find_bad_lines(block, has_label)
    if not bad:
        raise AssertionError(
            "internal error: the vectorised parser rejected a block that the exact line scan "
            "accepts; please report this with the input file"
        )
    if stop_at_first:
        return SCHEMA.empty_table(), np.zeros(0, dtype=np.int64), bad[:1]
    n_lines = block.count(b"\n")
    keep = np.ones(n_lines, dtype=bool)
    keep[[b.line for b in bad]] = False
    table = parse_fast(drop_lines(block, [b.line for b in bad]), has_label)
    if table is None:
        raise AssertionError(
            "internal error: the good lines of a block failed to parse; please report this "
            "with the input file"
        )
    return table, np.flatnonzero(keep), bad
