"""Reading TSV input as line-aligned blocks, and cutting it into chunks.

Chunks are byte ranges of the (uncompressed) text, defined so that any reader finds the
same ones, whether it seeks (plain files, chunks converted in parallel) or streams (.gz,
which cannot be seeked, so one worker walks the whole file):

    chunk k starts at S_k = the first line start at or after k * chunk_bytes (S_0 = 0),
    and ends where chunk k + 1 starts (or at the end of the text).

A line longer than ``chunk_bytes`` can make some S_k coincide; those chunks are empty and
produce nothing. A non-empty chunk k always has ``k * chunk_bytes <= S_k < (k+1) *
chunk_bytes``, so ``k == S_k // chunk_bytes``: a streaming reader that meets a line start
past the current chunk knows the new chunk's index from the offset alone.

Lines: a file of text ``t`` has ``t.count(b"\\n")`` lines, plus one if it is non-empty and
does not end in ``\\n``. Blocks handed to the parser always end in ``\\n`` (one is added to
a final line that lacks it).
"""

from __future__ import annotations

import gzip
import zlib
import io
import os
from collections.abc import Callable, Iterator
from typing import BinaryIO

BLOCK_BYTES = 16 << 20
"""Default read size: big enough to amortise per-block costs, small enough to keep a
worker's memory at a few hundred MB."""
MAX_LINE_BYTES = 1 << 20
"""A Criteo line is ~250 bytes; a 'line' over 1 MiB means the input is not TSV text, and
reading on until a newline would load the whole file."""


class LineTooLongError(ValueError):
    """No newline within ``MAX_LINE_BYTES``; ``offset`` is where that line starts."""

    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


TRUNCATED = (EOFError, gzip.BadGzipFile, zlib.error)
"""What reading a cut (or damaged) gzip stream raises."""


def truncated_message(path: str, lines: int | None = None, text_bytes: int | None = None) -> str:
    """One line for a gzip file whose data stops before its end marker."""
    where = f" at line {lines + 1:,} of its text (after {text_bytes:,} bytes)" if lines is not None else ""
    return (f"{path}: truncated: the gzip data ends{where} without its end-of-stream marker (an interrupted "
            f"copy or download?). Pass --on-bad-line skip to keep the complete lines before the cut.")


def is_gzip(path: str) -> bool:
    """True for gzip input, judged by the file's magic bytes (not its name)."""
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def open_text(path: str) -> tuple[BinaryIO, BinaryIO]:
    """Opens ``path`` for reading its text: ``(text_stream, raw_file)``.

    For gzip the text stream decompresses (multi-member files included) and ``raw_file``
    is the compressed file underneath, whose ``tell()`` measures progress on disk.
    """
    raw = open(path, "rb")
    if is_gzip(path):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return raw, raw


def line_start_at_or_after(f: BinaryIO, pos: int, size: int) -> int:
    """The first line start ``>= pos`` in a seekable file of ``size`` bytes (``size`` if none)."""
    if pos <= 0:
        return 0
    if pos >= size:
        return size
    f.seek(pos - 1)
    offset = pos - 1
    while True:
        data = f.read(1 << 16)
        if not data:
            return size
        i = data.find(b"\n")
        if i >= 0:
            return offset + i + 1
        offset += len(data)


def plain_chunks(path: str, chunk_bytes: int) -> list[tuple[int, int, int]]:
    """The non-empty chunks of an uncompressed file: ``[(index, start, end), ...]``."""
    size = os.path.getsize(path)
    starts: list[int] = []
    with open(path, "rb") as f:
        for k in range(0, -(-size // chunk_bytes)):
            s = line_start_at_or_after(f, k * chunk_bytes, size)
            if s < size and (not starts or s != starts[-1]):
                starts.append(s)
    ends = starts[1:] + [size]
    return [(s // chunk_bytes, s, e) for s, e in zip(starts, ends)]


def iter_line_blocks(
    read: Callable[[int], bytes], block_bytes: int = BLOCK_BYTES, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[bytes]:
    """Consecutive pieces of a stream, each made of whole lines ending in ``\\n``.

    Concatenated, the pieces are the stream's bytes, except that a final line without a
    newline gets one. A line longer than ``block_bytes`` makes a longer piece; one longer
    than ``max_line_bytes`` raises ``LineTooLongError`` (offset relative to the stream).
    """
    carry = b""
    offset = 0  # of ``carry`` in the stream
    while True:
        data = read(block_bytes)
        if not data:
            if carry:
                yield carry + b"\n"
            return
        buf = carry + data if carry else data
        cut = buf.rfind(b"\n") + 1
        if cut == 0:
            if len(buf) > max_line_bytes:
                raise LineTooLongError(offset)
            carry = buf
            continue
        offset += cut
        if cut == len(buf):
            carry = b""
            yield buf
        else:
            carry = buf[cut:]
            yield buf[:cut]


def range_reader(f: BinaryIO, start: int, end: int) -> Callable[[int], bytes]:
    """A ``read(n)`` over bytes ``[start, end)`` of a seekable file."""
    f.seek(start)
    left = end - start

    def read(n: int) -> bytes:
        nonlocal left
        data = f.read(min(n, left)) if left > 0 else b""
        left -= len(data)
        return data

    return read


def iter_chunk_blocks(blocks: Iterator[bytes], chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    """Tags the blocks of a whole text with their chunk index, splitting blocks at chunk starts.

    Yields ``(chunk_index, block)``; blocks of one chunk come in a row, chunks in order.
    """
    offset = 0  # text offset of the start of ``block``
    chunk = 0
    for block in blocks:
        while block:
            next_target = (chunk + 1) * chunk_bytes  # chunk + 1 starts at the first line start >= this
            rel = next_target - offset
            if rel <= 0:
                # ``block`` begins at a line start (every block does) past the target.
                chunk = offset // chunk_bytes
                continue
            if rel >= len(block):
                yield chunk, block
                offset += len(block)
                break
            cut = block.find(b"\n", rel - 1) + 1
            if cut == 0 or cut >= len(block):
                yield chunk, block
                offset += len(block)
                break
            yield chunk, block[:cut]
            block = block[cut:]
            offset += cut


def count_lines(path: str, start: int = 0, end: int | None = None, block_bytes: int = BLOCK_BYTES) -> int:
    """Lines in bytes ``[start, end)`` of the text of ``path`` (decompressed for gzip).

    ``start``/``end`` must be line starts (or the end) so that a final line without a newline
    is counted once; ``end=None`` means the end of the text.
    """
    stream, raw = open_text(path)
    with raw, stream:
        if start:
            if stream is raw:
                raw.seek(start)
            else:
                _skip(stream, start)
        left = None if end is None else end - start
        lines = 0
        last = b"\n"
        while left is None or left > 0:
            data = stream.read(block_bytes if left is None else min(block_bytes, left))
            if not data:
                break
            lines += data.count(b"\n")
            last = data[-1:]
            if left is not None:
                left -= len(data)
        return lines + (last != b"\n")


def _skip(stream: io.BufferedIOBase | BinaryIO, n: int) -> None:
    while n > 0:
        data = stream.read(min(n, BLOCK_BYTES))
        if not data:
            return
        n -= len(data)


def first_lines(path: str, n: int) -> list[bytes]:
    """Up to ``n`` first lines of the text of ``path`` (without newlines; bounded read)."""
    stream, raw = open_text(path)
    with raw, stream:
        out = []
        for _ in range(n):
            line = stream.readline(1 << 20)
            if not line:
                break
            out.append(line.rstrip(b"\n"))
        return out
