"""The work a converter process does: count lines, convert a chunk (or a whole .gz file).

Tasks are small picklable dataclasses run by ``run_task``, either in the main process
(one worker) or in a pool of worker processes. Progress (bytes read, rows written) goes to
a sink set per process: a callback in the main process, a queue in a worker.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deepfm_dist.prepare import blocks, state, tsv
from deepfm_dist.prepare.errors import BadLineError, PrepareError

MAX_BAD_EXAMPLES = 10
"""Bad lines kept per chunk, with their reasons, for the manifest."""


# --------------------------------------------------------------------------- progress

_sink: Callable[[int, int], None] | None = None


def set_progress_sink(sink: Callable[[int, int], None] | None) -> None:
    """Where ``(bytes_read, rows_written)`` increments go in this process."""
    global _sink
    _sink = sink


def report_progress(nbytes: int = 0, rows: int = 0) -> None:
    if _sink is not None:
        _sink(nbytes, rows)


def init_worker(queue: Any) -> None:
    """Pool initializer: report progress through ``queue``; leave Ctrl-C to the parent,
    which stops the pool and cleans up (a worker dying mid-write leaves only a temp file)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_progress_sink(lambda b, r: queue.put((b, r)))


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class InputFile:
    path: str
    prefix: str
    """``NNN-STEM``: output names of this input start with it (see ``state``)."""
    size: int
    mtime_ns: int
    gz: bool
    has_label: bool


@dataclass(frozen=True)
class WriteSettings:
    out_dir: str
    chunk_bytes: int
    block_bytes: int
    row_group_rows: int
    compression: str
    skip_bad: bool
    fingerprint: str
    """Of the output-shaping settings; stored in every chunk record."""


@dataclass(frozen=True)
class Routing:
    """Which split each line goes to, by its position in the split's scope.

    ``cuts`` holds ``(first_position, split)`` in increasing order; a line at position
    ``p`` goes to the last split whose first position is ``<= p``. ``first_position`` is
    the position of the task's first line (None when there is a single split and it
    does not matter).
    """

    cuts: tuple[tuple[int, str], ...]
    first_position: int | None = None

    def shifted(self, lines: int) -> Routing:
        if self.first_position is None:
            return self
        return Routing(self.cuts, self.first_position + lines)


@dataclass(frozen=True)
class ChunkTask:
    """Convert chunk ``chunk`` (text bytes ``[start, end)``) of a plain file."""

    input: InputFile
    chunk: int
    start: int
    end: int
    first_line: int | None
    """0-based line number in the file of the chunk's first line, if known (for messages)."""
    routing: Routing
    settings: WriteSettings


@dataclass(frozen=True)
class GzTask:
    """Convert every chunk of a gzip file, in order, skipping those already done."""

    input: InputFile
    routing: Routing
    settings: WriteSettings


@dataclass(frozen=True)
class CountTask:
    """Count the lines of text bytes ``[start, end)`` of a file (``end=None``: to the end)."""

    path: str
    start: int = 0
    end: int | None = None


def run_task(task: ChunkTask | GzTask | CountTask) -> Any:
    try:
        if isinstance(task, ChunkTask):
            return [convert_plain_chunk(task)]
        if isinstance(task, GzTask):
            return convert_gz_file(task)
        if isinstance(task, CountTask):
            return count_task(task)
    except blocks.TRUNCATED:
        path = task.path if isinstance(task, CountTask) else task.input.path
        raise PrepareError(blocks.truncated_message(path)) from None
    except blocks.LineTooLongError as e:
        path = task.path if isinstance(task, CountTask) else task.input.path
        start = task.start if isinstance(task, (ChunkTask, CountTask)) else 0
        raise PrepareError(
            f"{path}: the line starting at byte {start + e.offset:,} of the text has no newline within "
            f"{blocks.MAX_LINE_BYTES:,} bytes; a Criteo line is ~250 bytes: is this the right file?"
        ) from None
    raise TypeError(f"unknown task {task!r}")


def count_task(task: CountTask) -> int:
    lines = blocks.count_lines(task.path, task.start, task.end)
    size = os.path.getsize(task.path)
    report_progress(nbytes=(task.end if task.end is not None else size) - task.start)
    return lines


# --------------------------------------------------------------------------- writing


class _SplitWriter:
    """One output Parquet file, written under a temp name, with fixed-size row groups."""

    def __init__(self, final: str, settings: WriteSettings, metadata: dict[str, str]) -> None:
        self.final = final
        self.tmp = state.tmp_path(final)
        self.settings = settings
        self.schema = tsv.SCHEMA.with_metadata(metadata)
        self.writer: pq.ParquetWriter | None = None
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.settings.row_group_rows:
            self._flush(self.settings.row_group_rows)

    def _flush(self, n: int) -> None:
        if self.writer is None:
            os.makedirs(os.path.dirname(self.final), exist_ok=True)
            self.writer = pq.ParquetWriter(
                self.tmp,
                self.schema,
                compression=self.settings.compression,
                # Dictionary pages pay off only for the low-cardinality integer columns; the
                # hash columns would fill a dictionary and fall back to plain anyway.
                use_dictionary=[tsv.LABEL, *tsv.DENSE],
                write_statistics=True,
            )
        table = pa.concat_tables(self.pending)
        self.writer.write_table(table.slice(0, n), row_group_size=n)
        rest = table.slice(n)
        self.pending = [rest] if rest.num_rows else []
        self.pending_rows -= n
        self.rows += n

    def close(self) -> dict[str, Any] | None:
        """Finishes the file and renames it into place; None if it got no rows."""
        if self.pending_rows:
            self._flush(self.pending_rows)
        if self.writer is None:
            return None
        writer, self.writer = self.writer, None
        writer.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())  # the data is on disk before the name says it is complete
        os.replace(self.tmp, self.final)
        return {"bytes": os.path.getsize(self.final), "rows": self.rows}

    def abort(self) -> None:
        """Drops the temp file (a no-op after ``close``, which renamed it)."""
        try:
            if self.writer is not None:
                self.writer.close()
        except Exception:  # noqa: BLE001 - best effort; the temp file is deleted next
            pass
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def _bad_line_message(inp: InputFile, file_line: int, reason: str) -> str:
    return (
        f"{inp.path}:{file_line + 1}: {reason}. Pass --on-bad-line skip to drop malformed "
        f"lines (they are counted and reported)."
    )


def _convert_chunk(
    inp: InputFile,
    chunk: int,
    text_start: int,
    line_blocks: Iterator[bytes],
    first_line: int | None,
    routing: Routing,
    s: WriteSettings,
    locate_first_line: Callable[[], int],
) -> dict[str, Any]:
    """Parses the blocks of one chunk into its output files and writes its record.

    ``locate_first_line`` computes the chunk's first file line when ``first_line`` is None
    (only needed for an error message, so it may be slow).
    """
    state.remove_chunk(s.out_dir, inp.prefix, chunk)
    metadata = {
        "deepfm_dist.source": inp.path,
        "deepfm_dist.chunk": str(chunk),
        "deepfm_dist.layout": "labelled" if inp.has_label else "unlabelled",
    }
    writers: dict[str, _SplitWriter] = {}
    split_names = [name for _, name in routing.cuts]
    cut_positions = np.array([p for p, _ in routing.cuts], dtype=np.int64)
    lines = rows = bad_count = 0
    examples: list[dict[str, Any]] = []
    text_end = text_start
    try:
        for block in line_blocks:
            n_lines = block.count(b"\n")
            table, row_lines, bad = tsv.parse_block(block, inp.has_label, stop_at_first=not s.skip_bad)
            if bad:
                if not s.skip_bad:
                    base = first_line if first_line is not None else locate_first_line()
                    raise BadLineError(_bad_line_message(inp, base + lines + bad[0].line, bad[0].reason))
                bad_count += len(bad)
                for b in bad[: MAX_BAD_EXAMPLES - len(examples)]:
                    examples.append({"line_in_chunk": lines + b.line, "reason": b.reason})
            if len(split_names) == 1:
                pieces = [(split_names[0], table)]
            else:
                offsets = row_lines if row_lines is not None else np.arange(table.num_rows)
                positions = routing.first_position + lines + offsets
                # Rows are in line order, so each split is a contiguous slice.
                bounds = np.searchsorted(positions, cut_positions, side="left").tolist() + [table.num_rows]
                pieces = [
                    (name, table.slice(lo, hi - lo))
                    for name, lo, hi in zip(split_names, bounds[:-1], bounds[1:])
                    if hi > lo
                ]
            for name, piece in pieces:
                if name not in writers:
                    final = state.output_path(s.out_dir, name, inp.prefix, chunk)
                    writers[name] = _SplitWriter(final, s, metadata)
                writers[name].add(piece)
            lines += n_lines
            rows += table.num_rows
            text_end += len(block)
            report_progress(rows=table.num_rows)
        outputs = []
        for name in split_names:  # close in split order: deterministic record contents
            if name in writers:
                info = writers[name].close()
                if info is not None:
                    rel = os.path.relpath(state.output_path(s.out_dir, name, inp.prefix, chunk), s.out_dir)
                    outputs.append({"split": name, "path": rel, **info})
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    record = {
        "fingerprint": s.fingerprint,
        "input": inp.path,
        "input_size": inp.size,
        "input_mtime_ns": inp.mtime_ns,
        "chunk": chunk,
        "text_start": text_start,
        "text_end": text_start + _text_len(inp, text_start, text_end),
        "lines": lines,
        "rows": rows,
        "bad_lines": bad_count,
        "bad_examples": examples,
        "outputs": outputs,
    }
    state.write_json_atomic(state.record_path(s.out_dir, inp.prefix, chunk), record)
    return record


def _text_len(inp: InputFile, start: int, end: int) -> int:
    """``end - start``, less the newline ``iter_line_blocks`` adds to a final line without one."""
    if not inp.gz and end > inp.size:
        return inp.size - start
    return end - start


def convert_plain_chunk(task: ChunkTask) -> dict[str, Any]:
    inp, s = task.input, task.settings
    with open(inp.path, "rb") as f:
        read = blocks.range_reader(f, task.start, task.end)

        def read_counted(n: int) -> bytes:
            data = read(n)
            report_progress(nbytes=len(data))
            return data

        return _convert_chunk(
            inp,
            task.chunk,
            task.start,
            blocks.iter_line_blocks(read_counted, s.block_bytes),
            task.first_line,
            task.routing,
            s,
            locate_first_line=lambda: blocks.count_lines(inp.path, 0, task.start),
        )


def convert_gz_file(task: GzTask) -> list[dict[str, Any]]:
    """Streams a gzip file once; chunks with a complete record are only decompressed."""
    inp, s = task.input, task.settings
    stream, raw = blocks.open_text(inp.path)
    records = []
    with raw, stream:
        last_pos = 0
        text_bytes = text_lines = 0
        truncated: dict[str, Any] | None = None

        def read_counted(n: int) -> bytes:
            nonlocal last_pos, text_bytes, text_lines, truncated
            if truncated is not None:
                return b""
            try:
                data = stream.read(n)
            except blocks.TRUNCATED:
                if not s.skip_bad:
                    raise PrepareError(blocks.truncated_message(inp.path, text_lines, text_bytes)) from None
                # --on-bad-line skip: the text ends here; a line cut in two is a bad line.
                truncated = {"file": inp.path, "line": text_lines + 1, "text_bytes": text_bytes}
                return b""
            text_bytes += len(data)
            text_lines += data.count(b"\n")
            pos = raw.tell()
            report_progress(nbytes=pos - last_pos)
            last_pos = pos
            return data

        tagged = blocks.iter_chunk_blocks(blocks.iter_line_blocks(read_counted, s.block_bytes), s.chunk_bytes)
        file_line = text_offset = 0
        for chunk, group in itertools.groupby(tagged, key=lambda t: t[0]):
            line_blocks = (b for _, b in group)
            record = state.read_json(state.record_path(s.out_dir, inp.prefix, chunk))
            if state.record_is_complete(s.out_dir, record, fp=s.fingerprint, size=inp.size, mtime_ns=inp.mtime_ns):
                for _ in line_blocks:  # already converted: just move past it
                    pass
                report_progress(rows=record["rows"])
            else:
                record = _convert_chunk(
                    inp,
                    chunk,
                    text_offset,
                    line_blocks,
                    file_line,
                    task.routing.shifted(file_line),
                    s,
                    locate_first_line=lambda: file_line,
                )
            records.append(record)
            file_line += record["lines"]
            text_offset = record["text_end"]
        report_progress(nbytes=inp.size - last_pos)
    if truncated is not None and records:  # recorded with the last chunk, for the manifest
        records[-1] = {**records[-1], "truncated": truncated}
        state.write_json_atomic(state.record_path(s.out_dir, inp.prefix, records[-1]["chunk"]), records[-1])
    # Chunks beyond the end of this (changed) file, left by an earlier run.
    done = {r["chunk"] for r in records}
    for chunk in state.chunks_on_disk(s.out_dir, inp.prefix) - done:
        state.remove_chunk(s.out_dir, inp.prefix, chunk)
    return records
