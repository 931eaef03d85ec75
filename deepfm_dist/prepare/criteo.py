"""``prepare-criteo``: Criteo TSV (Kaggle ``train.txt``, Terabyte ``day_N[.gz]``) -> Parquet.

    prepare-criteo --input 'day_*.gz' --output data/criteo_tb --split terabyte
    prepare-criteo --input train.txt --output data/criteo_kaggle --split kaggle --vocab-threshold 10

See ``data/CRITEO.md`` for the format, splits, resume semantics and performance. In short:

1. plan: list inputs (natural order), detect gzip and the labelled/unlabelled layout, cut
   plain files into chunks at line boundaries, and count lines where a split needs them;
2. convert: chunks of plain files in parallel, .gz files one worker each, every output
   written under a temp name and renamed; a chunk whose record is complete is skipped;
3. optionally count categorical values over the train split (``--vocab-threshold``);
4. write ``manifest.json`` last.
"""

from __future__ import annotations

import argparse
import glob
import multiprocessing as mp
import os
import queue as queue_mod
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from deepfm_dist.prepare import blocks, state, tsv, vocab
from deepfm_dist.prepare.convert import (
    ChunkTask,
    CountTask,
    GzTask,
    InputFile,
    Routing,
    WriteSettings,
    init_worker,
    report_progress,
    run_task,
    set_progress_sink,
)
from deepfm_dist import cli
from deepfm_dist.prepare.errors import PrepareError

SPLITS = ("none", "kaggle", "terabyte")
LAYOUTS = ("auto", "labelled", "unlabelled")
BAD_LINE_POLICIES = ("error", "skip")
COMPRESSIONS = ("zstd", "snappy")
TERABYTE_DAYS = 24
FORMAT = "deepfm-dist criteo parquet v1"
"""Bumped when the output of the same input and settings would change."""


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _fraction(text: str) -> Fraction:
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a fraction like 0.05 or 1/14, got {text!r}") from None


@dataclass
class PrepareConfig:
    inputs: list[str]
    """--input: TSV files or globs (quoted), plain or gzip; processed in natural sort order."""
    output: str
    """--output: directory for train/ val/ test/ (or all/), vocab/, manifest.json."""
    split: str = "none"
    """--split: none (everything to all/), kaggle (last rows -> val, test) or terabyte
    (day_0..day_22 -> train, day_23 halves -> val, test)."""
    val_fraction: Fraction = Fraction(1, 14)
    """--val-fraction (kaggle): share of lines, floor(N * F), just before the test lines.
    1/14 each for val and test = the last seventh (Kaggle's 7th day) split in halves."""
    test_fraction: Fraction = Fraction(1, 14)
    """--test-fraction (kaggle): share of lines, floor(N * F), at the very end."""
    layout: str = "auto"
    """--layout: labelled (40 fields), unlabelled (39, Criteo's test files) or auto (from
    the field count of each file's first lines; all inputs must agree)."""
    on_bad_line: str = "error"
    """--on-bad-line: error (stop at the first malformed line, naming file, line, field) or
    skip (drop it, count it, report the count and the first few)."""
    workers: int = field(default_factory=_default_workers)
    """--workers: processes converting in parallel (default: the usable cores)."""
    chunk_mb: float = 256
    """--chunk-mb: MB (1e6 bytes) of TSV text per chunk; one chunk -> one Parquet file per split it
    feeds, so this is the output file size knob (files come out ~0.3x this with zstd)."""
    row_group_rows: int = 256 * 1024
    """--row-group-rows: rows per Parquet row group (the reader's unit of memory)."""
    compression: str = "zstd"
    """--compression: zstd (smaller) or snappy (faster to read)."""
    vocab_threshold: int = 0
    """--vocab-threshold: T >= 1 builds vocab/ (values seen < T times in train -> id 0);
    0 skips the vocabulary pass."""
    vocab_partitions: int = 1
    """--vocab-partitions: count each column in at least this many passes (more are taken where one
    pass would hold over 2M distinct values): memory per pass is bounded whatever the data size."""
    overwrite: bool = False
    """--overwrite: delete an earlier conversion in --output (made with other settings)."""
    progress: bool = True
    """False with --quiet: no progress bars (the summary is still printed)."""
    block_mb: float = 16
    """--block-mb: MB (1e6 bytes) read and parsed at a time; memory per worker is a few times this plus
    one row group (does not change the output)."""

    def __post_init__(self) -> None:
        def require(ok: bool, flag: str, value: Any, expected: str) -> None:
            if not ok:
                raise PrepareError(f"{flag} {value}: expected {expected}")

        require(len(self.inputs) > 0, "--input", self.inputs, "at least one file or glob")
        require(bool(self.output), "--output", repr(self.output), "a directory")
        require(self.split in SPLITS, "--split", self.split, f"one of {', '.join(SPLITS)}")
        require(self.layout in LAYOUTS, "--layout", self.layout, f"one of {', '.join(LAYOUTS)}")
        require(self.on_bad_line in BAD_LINE_POLICIES, "--on-bad-line", self.on_bad_line, "error or skip")
        require(self.compression in COMPRESSIONS, "--compression", self.compression, "zstd or snappy")
        require(0 <= self.val_fraction < 1, "--val-fraction", self.val_fraction, "a fraction in [0, 1)")
        require(0 <= self.test_fraction < 1, "--test-fraction", self.test_fraction, "a fraction in [0, 1)")
        require(
            self.val_fraction + self.test_fraction < 1,
            "--val-fraction + --test-fraction",
            self.val_fraction + self.test_fraction,
            "less than 1 (some lines must stay in train)",
        )
        require(self.workers >= 1, "--workers", self.workers, "an integer >= 1")
        require(self.chunk_mb >= 0.001, "--chunk-mb", self.chunk_mb, "a size >= 0.001 (1000 bytes)")
        require(self.block_mb >= 0.001, "--block-mb", self.block_mb, "a size >= 0.001 (1000 bytes)")
        require(self.row_group_rows >= 1, "--row-group-rows", self.row_group_rows, "an integer >= 1")
        require(self.vocab_threshold >= 0, "--vocab-threshold", self.vocab_threshold, "an integer >= 0 (0: no vocabulary)")
        require(self.vocab_partitions >= 1, "--vocab-partitions", self.vocab_partitions, "an integer >= 1")

    @property
    def chunk_bytes(self) -> int:
        return int(self.chunk_mb * 1_000_000)

    def output_settings(self, inputs: list[str]) -> dict[str, Any]:
        """Everything that shapes the outputs; a rerun must match it to resume."""
        return {
            "format": FORMAT,
            "inputs": inputs,
            "split": self.split,
            "val_fraction": str(self.val_fraction) if self.split == "kaggle" else None,
            "test_fraction": str(self.test_fraction) if self.split == "kaggle" else None,
            "layout": self.layout,
            "chunk_bytes": self.chunk_bytes,
            "row_group_rows": self.row_group_rows,
            "compression": self.compression,
        }


def _doc(name: str) -> str:
    """A field's documentation (config dataclass) as the flag's help, without its leading flag name."""
    return re.sub(r"^--[\w-]+(?: \(\w+\))?: ", "", cli.field_docs(PrepareConfig)[name]).replace("%", "%%")


def build_parser() -> cli.Parser:
    """The flags, documented by ``PrepareConfig``'s fields (the one CLI mechanism: ``deepfm_dist/cli.py``)."""
    d = PrepareConfig(inputs=["-"], output="-")
    p = cli.Parser(
        prog="prepare-criteo",
        description="Convert Criteo TSV (Kaggle train.txt, Terabyte day_N[.gz]) to Parquet. See data/CRITEO.md.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB", help=_doc("inputs"))
    p.add_argument("--output", required=True, metavar="DIR", help=_doc("output"))
    p.add_argument("--split", choices=SPLITS, default=d.split, help=_doc("split") + f" (default: {d.split})")
    p.add_argument("--val-fraction", type=_fraction, default=d.val_fraction, metavar="F", help=_doc("val_fraction") + f" (default: {d.val_fraction})")
    p.add_argument("--test-fraction", type=_fraction, default=d.test_fraction, metavar="F", help=_doc("test_fraction") + f" (default: {d.test_fraction})")
    p.add_argument("--layout", choices=LAYOUTS, default=d.layout, help=_doc("layout") + f" (default: {d.layout})")
    p.add_argument("--no-label", dest="layout", action="store_const", const="unlabelled", help="same as --layout unlabelled")
    p.add_argument("--on-bad-line", choices=BAD_LINE_POLICIES, default=d.on_bad_line, help=_doc("on_bad_line") + f" (default: {d.on_bad_line})")
    p.add_argument("--workers", type=int, default=d.workers, help=_doc("workers") + f" (default: {d.workers})")
    p.add_argument("--chunk-mb", type=float, default=d.chunk_mb, help=_doc("chunk_mb") + f" (default: {d.chunk_mb})")
    p.add_argument("--row-group-rows", type=int, default=d.row_group_rows, help=_doc("row_group_rows") + f" (default: {d.row_group_rows})")
    p.add_argument("--compression", choices=COMPRESSIONS, default=d.compression, help=_doc("compression") + f" (default: {d.compression})")
    p.add_argument("--vocab-threshold", type=int, default=d.vocab_threshold, metavar="T", help=_doc("vocab_threshold") + f" (default: {d.vocab_threshold})")
    p.add_argument("--vocab-partitions", type=int, default=d.vocab_partitions, metavar="P", help=_doc("vocab_partitions") + f" (default: {d.vocab_partitions})")
    p.add_argument("--overwrite", action="store_true", help=_doc("overwrite"))
    p.add_argument("--quiet", action="store_true", help=_doc("progress"))
    p.add_argument("--block-mb", type=float, default=d.block_mb, help=argparse.SUPPRESS)
    return p


def config_from_args(argv: Sequence[str] | None) -> PrepareConfig:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return _config(a)
    except PrepareError as e:  # a bad flag value: one line, exit status 2, like every console script
        parser.error(str(e))


def _config(a) -> PrepareConfig:
    return PrepareConfig(
        inputs=a.input,
        output=a.output,
        split=a.split,
        val_fraction=a.val_fraction,
        test_fraction=a.test_fraction,
        layout=a.layout,
        on_bad_line=a.on_bad_line,
        workers=a.workers,
        chunk_mb=a.chunk_mb,
        row_group_rows=a.row_group_rows,
        compression=a.compression,
        vocab_threshold=a.vocab_threshold,
        vocab_partitions=a.vocab_partitions,
        overwrite=a.overwrite,
        progress=not a.quiet,
        block_mb=a.block_mb,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
        prepare(cfg)
    except PrepareError as e:
        print(f"prepare-criteo: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "prepare-criteo: interrupted; finished chunks are kept, rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    return 0


# --------------------------------------------------------------------------- planning


def resolve_inputs(specs: list[str]) -> list[str]:
    """Files named by paths or globs, absolute, de-duplicated, in natural sort order."""
    found: dict[str, None] = {}
    for spec in specs:
        if os.path.isdir(spec):
            raise PrepareError(f"--input {spec}: is a directory; expected TSV files or a glob like '{spec}/day_*'")
        if os.path.isfile(spec):
            matches = [spec]
        else:
            matches = [m for m in glob.glob(os.path.expanduser(spec)) if os.path.isfile(m)]
            if not matches:
                raise PrepareError(f"--input {spec}: no such file, and as a glob it matches no file")
        for m in matches:
            found[os.path.abspath(m)] = None
    return sorted(found, key=lambda p: state.natural_key(p))


def detect_layout(path: str, gz: bool) -> bool | None:
    """True/False: labelled/unlabelled, from the commonest field count of the first lines;
    None for an empty file."""
    try:
        lines = blocks.first_lines(path, 100)
    except blocks.TRUNCATED:
        raise PrepareError(blocks.truncated_message(path)) from None
    if not lines:
        return None
    counts: dict[int, int] = {}
    for line in lines:
        n = line.rstrip(b"\r").count(b"\t") + 1
        counts[n] = counts.get(n, 0) + 1
    n = max(counts, key=lambda k: counts[k])
    if n == tsv.LABELLED_FIELDS:
        return True
    if n == tsv.UNLABELLED_FIELDS:
        return False
    raise PrepareError(
        f"{path}: most of the first {len(lines)} lines have {n} tab-separated fields; expected "
        f"{tsv.LABELLED_FIELDS} (label, I1..I13, C1..C26) or {tsv.UNLABELLED_FIELDS} (no label). "
        f"Is this Criteo TSV{' (gzip-compressed)' if gz else ''}?"
    )


def terabyte_day(path: str) -> int:
    m = re.fullmatch(r"day_(\d+)(?:\.[A-Za-z0-9]+)*", os.path.basename(path))
    if not m or not 0 <= int(m.group(1)) < TERABYTE_DAYS:
        raise PrepareError(
            f"--split terabyte: input {path} is not named day_0 .. day_23 (optionally .gz); "
            f"the day number decides its split"
        )
    return int(m.group(1))


@dataclass
class _Plan:
    inputs: list[InputFile]
    chunks: dict[str, list[tuple[int, int, int]]]
    """Plain inputs: prefix -> [(chunk, start, end)]."""
    routing: dict[str, Routing]
    """prefix -> routing of the input's first line."""
    chunk_lines: dict[str, list[int]]
    """prefix -> lines per chunk (plain) or [total] (gz), where counted."""


def _prepare_output_dir(cfg: PrepareConfig, settings: dict[str, Any]) -> None:
    out = cfg.output
    settings_path = os.path.join(out, state.PROGRESS_DIR, "settings.json")
    old = state.read_json(settings_path)
    ours = [os.path.join(out, d) for d in (*state.SPLIT_DIRS, state.VOCAB_DIR, state.PROGRESS_DIR)]
    ours.append(os.path.join(out, state.MANIFEST))
    if cfg.overwrite:
        for path in ours:
            if os.path.isdir(path):
                # keep the lock file, which we hold
                if os.path.basename(path) == state.PROGRESS_DIR:
                    for name in os.listdir(path):
                        if name != "lock":
                            p = os.path.join(path, name)
                            shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
                else:
                    shutil.rmtree(path)
            elif os.path.exists(path):
                os.unlink(path)
    elif old is not None and old != settings:
        diff = [f"{k}: was {old.get(k)!r}, now {settings.get(k)!r}" for k in settings if old.get(k) != settings.get(k)]
        raise PrepareError(
            f"{out} holds a conversion made with other settings ({'; '.join(diff)}). Rerun with "
            f"the same settings to resume, use a new --output, or pass --overwrite to delete it."
        )
    elif old is None:
        existing = [
            p for d in state.SPLIT_DIRS for p in glob.glob(os.path.join(glob.escape(os.path.join(out, d)), "*.parquet"))
        ]
        if existing:
            raise PrepareError(
                f"{out} already holds Parquet files not made by prepare-criteo (e.g. {existing[0]}); "
                f"use a new --output or pass --overwrite to delete {', '.join(state.SPLIT_DIRS)}/ there"
            )
    state.write_json_atomic(settings_path, settings)


def _plan(cfg: PrepareConfig, paths: list[str], bar: Callable[..., tqdm]) -> _Plan:
    width = max(3, len(str(len(paths) - 1)))
    inputs = []
    layouts: dict[str, bool | None] = {}
    for i, path in enumerate(paths):
        st = os.stat(path)
        gz = blocks.is_gzip(path)
        if cfg.layout == "auto":
            has_label = detect_layout(path, gz)
        else:
            has_label = cfg.layout == "labelled"
        layouts[path] = has_label
        inputs.append(
            InputFile(path, state.input_prefix(i, path, width), st.st_size, st.st_mtime_ns, gz, bool(has_label) if has_label is not None else True)
        )
    seen = {v for v in layouts.values() if v is not None}
    if len(seen) > 1:
        labelled = [p for p, v in layouts.items() if v]
        unlabelled = [p for p, v in layouts.items() if v is False]
        raise PrepareError(
            f"inputs mix layouts: {labelled[0]} has {tsv.LABELLED_FIELDS} fields (labelled), "
            f"{unlabelled[0]} has {tsv.UNLABELLED_FIELDS} (no label); convert them in separate runs"
        )
    if seen == {False} and cfg.split != "none":
        raise PrepareError(
            f"--split {cfg.split}: the inputs have no label column ({tsv.UNLABELLED_FIELDS} fields), "
            f"so they cannot feed train/val/test; use --split none"
        )

    chunks = {inp.prefix: blocks.plain_chunks(inp.path, cfg.chunk_bytes) for inp in inputs if not inp.gz}

    # Which inputs need line counts: those whose lines are split by position.
    if cfg.split == "kaggle":
        need_counts = list(inputs)
    elif cfg.split == "terabyte":
        days = {}
        for inp in inputs:
            day = terabyte_day(inp.path)
            if day in days:
                raise PrepareError(f"--split terabyte: day {day} given twice: {days[day].path} and {inp.path}")
            days[day] = inp
        need_counts = [days[TERABYTE_DAYS - 1]] if TERABYTE_DAYS - 1 in days else []
        if not need_counts:
            print(f"prepare-criteo: warning: no day_{TERABYTE_DAYS - 1} among the inputs: val/ and test/ stay empty", file=sys.stderr)
    else:
        need_counts = []
    chunk_lines = _count_lines(cfg, need_counts, chunks, bar)

    routing: dict[str, Routing] = {}
    if cfg.split == "none":
        for inp in inputs:
            routing[inp.prefix] = Routing(((0, "all"),))
    elif cfg.split == "terabyte":
        for inp in inputs:
            if terabyte_day(inp.path) < TERABYTE_DAYS - 1:
                routing[inp.prefix] = Routing(((0, "train"),))
            else:
                n = sum(chunk_lines[inp.prefix])
                routing[inp.prefix] = Routing(((0, "val"), (n // 2, "test")), first_position=0)
    else:
        n = sum(sum(chunk_lines[inp.prefix]) for inp in inputs)
        n_test = int(n * cfg.test_fraction)  # floor: Fraction * int is exact
        n_val = int(n * cfg.val_fraction)
        cuts = ((0, "train"), (n - n_val - n_test, "val"), (n - n_test, "test"))
        position = 0
        for inp in inputs:
            routing[inp.prefix] = Routing(cuts, first_position=position)
            position += sum(chunk_lines[inp.prefix])
    return _Plan(inputs, chunks, routing, chunk_lines)


def _count_lines(
    cfg: PrepareConfig, inputs: list[InputFile], chunks: dict[str, list[tuple[int, int, int]]], bar: Callable[..., tqdm]
) -> dict[str, list[int]]:
    """Lines per chunk (plain) or per file (gz); cached in _progress/lines.PREFIX.json."""
    out: dict[str, list[int]] = {}
    tasks: list[CountTask] = []
    owners: list[str] = []
    for inp in inputs:
        key = {"size": inp.size, "mtime_ns": inp.mtime_ns, "chunk_bytes": cfg.chunk_bytes}
        cached = state.read_json(os.path.join(cfg.output, state.PROGRESS_DIR, f"lines.{inp.prefix}.json"))
        if cached and cached.get("key") == key:
            out[inp.prefix] = cached["lines"]
            continue
        if inp.gz:
            tasks.append(CountTask(inp.path))
            owners.append(inp.prefix)
        else:
            for _, start, end in chunks[inp.prefix]:
                tasks.append(CountTask(inp.path, start, end))
                owners.append(inp.prefix)
            out[inp.prefix] = []
    if tasks:
        total = sum((t.end if t.end is not None else os.path.getsize(t.path)) - t.start for t in tasks)
        results = _run(cfg, tasks, bar(total=total, desc="count lines", unit="B", unit_scale=True))
        for prefix, lines in zip(owners, results):
            out.setdefault(prefix, []).append(lines)
        for inp in inputs:
            key = {"size": inp.size, "mtime_ns": inp.mtime_ns, "chunk_bytes": cfg.chunk_bytes}
            path = os.path.join(cfg.output, state.PROGRESS_DIR, f"lines.{inp.prefix}.json")
            state.write_json_atomic(path, {"key": key, "lines": out[inp.prefix]})
    return out


# --------------------------------------------------------------------------- running


def _run(cfg: PrepareConfig, tasks: list[Any], bar: tqdm, fn: Callable[[Any], Any] = run_task) -> list[Any]:
    """Runs ``fn`` on every task, in this process or a pool; results in task order."""
    rows = 0
    last_postfix = 0.0

    def on_progress(nbytes: int, nrows: int) -> None:
        nonlocal rows, last_postfix
        bar.update(nbytes)
        rows += nrows
        now = time.monotonic()
        if rows and nrows and now - last_postfix > 0.5:
            bar.set_postfix(rows=f"{rows:,}", refresh=False)
            last_postfix = now

    workers = min(cfg.workers, len(tasks))
    try:
        if workers <= 1:
            set_progress_sink(on_progress)
            try:
                return [fn(t) for t in tasks]
            finally:
                set_progress_sink(None)
        return _run_pool(workers, tasks, fn, on_progress, cfg.output)
    finally:
        if rows:
            bar.set_postfix(rows=f"{rows:,}", refresh=False)
        bar.close()


def _run_pool(workers: int, tasks: list[Any], fn: Callable[[Any], Any], on_progress: Callable[[int, int], None], out_dir: str) -> list[Any]:
    # spawn, not fork: the parent has pyarrow thread pools, which fork does not copy safely.
    ctx = mp.get_context("spawn")
    progress = ctx.Queue()
    pool = ctx.Pool(workers, initializer=init_worker, initargs=(progress,))

    def drain(timeout: float) -> None:
        try:
            item = progress.get(timeout=timeout) if timeout else progress.get_nowait()
            while True:
                on_progress(*item)
                item = progress.get_nowait()
        except queue_mod.Empty:
            pass

    try:
        pending = [pool.apply_async(fn, (t,)) for t in tasks]
        while True:
            drain(0.2)
            for r in pending:
                if r.ready() and not r.successful():
                    r.get()  # re-raises the worker's exception here
            if all(r.ready() for r in pending):
                break
        results = [r.get() for r in pending]
        pool.close()
        pool.join()
        drain(0)
        return results
    except BaseException:
        # Stop everything now; killed workers leave only temp files, removed here.
        pool.terminate()
        pool.join()
        state.remove_stale_temps(out_dir)
        raise


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Runs a whole conversion (see the module docstring); returns the manifest."""
    t0 = time.monotonic()
    paths = resolve_inputs(cfg.inputs)
    os.makedirs(cfg.output, exist_ok=True)
    out = cfg.output

    def bar(**kw: Any) -> tqdm:
        return tqdm(file=sys.stderr, disable=not cfg.progress, unit_divisor=1000, dynamic_ncols=True, **kw)

    with state.locked(out):
        settings = cfg.output_settings(paths)
        _prepare_output_dir(cfg, settings)
        manifest_path = os.path.join(out, state.MANIFEST)
        if os.path.exists(manifest_path):
            os.unlink(manifest_path)  # present again only once this run completes
        state.remove_stale_temps(out)
        fp = state.fingerprint(settings)
        plan = _plan(cfg, paths, bar)
        ws = WriteSettings(
            out_dir=out,
            chunk_bytes=cfg.chunk_bytes,
            block_bytes=int(cfg.block_mb * 1_000_000),
            row_group_rows=cfg.row_group_rows,
            compression=cfg.compression,
            skip_bad=cfg.on_bad_line == "skip",
            fingerprint=fp,
        )

        tasks: list[ChunkTask | GzTask] = []
        todo_bytes = 0
        skipped = 0
        for inp in plan.inputs:
            routing = plan.routing[inp.prefix]
            if inp.gz:
                tasks.append(GzTask(inp, routing, ws))
                todo_bytes += inp.size
                continue
            planned = plan.chunks[inp.prefix]
            for chunk in state.chunks_on_disk(out, inp.prefix) - {c for c, _, _ in planned}:
                state.remove_chunk(out, inp.prefix, chunk)  # the file changed since an earlier run
            counts = plan.chunk_lines.get(inp.prefix)
            line = 0
            for i, (chunk, start, end) in enumerate(planned):
                record = state.read_json(state.record_path(out, inp.prefix, chunk))
                first_line = line if counts is not None else (0 if i == 0 else None)
                if counts is not None:
                    line += counts[i]
                done = state.record_is_complete(out, record, fp=fp, size=inp.size, mtime_ns=inp.mtime_ns)
                if done and (record["text_start"], record["text_end"]) == (start, end):
                    skipped += 1
                    continue
                chunk_routing = routing.shifted(first_line) if first_line is not None else routing
                if routing.first_position is not None and first_line is None:
                    raise AssertionError("internal error: split by position without line counts")
                tasks.append(ChunkTask(inp, chunk, start, end, first_line, chunk_routing, ws))
                todo_bytes += end - start
        # Big tasks first, so that a long .gz file does not start last.
        tasks.sort(key=lambda t: -(t.input.size if isinstance(t, GzTask) else t.end - t.start))
        if skipped:
            print(f"prepare-criteo: resuming: {skipped} chunk(s) already converted", file=sys.stderr)
        t_convert = time.monotonic()
        if tasks:
            try:
                _run(cfg, tasks, bar(total=todo_bytes, desc="convert", unit="B", unit_scale=True))
            except BaseException:
                state.remove_stale_temps(out)  # ours: we hold the lock
                raise
        convert_s = time.monotonic() - t_convert

        records = _collect_records(out, plan, fp)
        _check_bad_lines(cfg, plan, records)
        manifest = _manifest(cfg, settings, plan, records)
        manifest["convert_seconds"] = round(convert_s, 3)
        if cfg.vocab_threshold:
            manifest["vocab"] = _build_vocab(cfg, manifest, bar)
        manifest["seconds"] = round(time.monotonic() - t0, 3)
        state.write_json_atomic(manifest_path, manifest)
        _print_summary(manifest, manifest_path)
        return manifest


# --------------------------------------------------------------------------- results


def _collect_records(out: str, plan: _Plan, fp: str) -> dict[str, list[dict[str, Any]]]:
    """Every input's chunk records, in chunk order; all must be complete by now."""
    result = {}
    for inp in plan.inputs:
        if inp.gz:
            chunks = sorted(state.chunks_on_disk(out, inp.prefix))
        else:
            chunks = [c for c, _, _ in plan.chunks[inp.prefix]]
        records = []
        for chunk in chunks:
            record = state.read_json(state.record_path(out, inp.prefix, chunk))
            if not state.record_is_complete(out, record, fp=fp, size=inp.size, mtime_ns=inp.mtime_ns):
                raise PrepareError(
                    f"{inp.path}: chunk {chunk} is not complete after conversion; was the input "
                    f"modified while converting? Rerun to redo it."
                )
            records.append(record)
        result[inp.prefix] = records
    return result


def _bad_examples(inp: InputFile, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    examples = []
    first_line = 0
    for r in records:
        for e in r["bad_examples"]:
            examples.append({"file": inp.path, "line": first_line + e["line_in_chunk"] + 1, "reason": e["reason"]})
        first_line += r["lines"]
    return examples


def _check_bad_lines(cfg: PrepareConfig, plan: _Plan, records: dict[str, list[dict[str, Any]]]) -> None:
    """Under --on-bad-line error, bad lines skipped by an earlier ``skip`` run still fail."""
    if cfg.on_bad_line != "error":
        return
    for inp in plan.inputs:
        examples = _bad_examples(inp, records[inp.prefix])
        if examples:
            e = examples[0]
            raise PrepareError(
                f"{e['file']}:{e['line']}: {e['reason']} (converted earlier with --on-bad-line skip; "
                f"rerun with --on-bad-line skip to accept the skipped lines)"
            )


def _manifest(cfg: PrepareConfig, settings: dict[str, Any], plan: _Plan, records: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    inputs, outputs = [], []
    splits: dict[str, dict[str, Any]] = {}
    bad_total = 0
    examples: list[dict[str, Any]] = []
    for inp in plan.inputs:
        recs = records[inp.prefix]
        bad = sum(r["bad_lines"] for r in recs)
        bad_total += bad
        examples += _bad_examples(inp, recs)
        inputs.append(
            {
                "path": inp.path,
                "size": inp.size,
                "mtime_ns": inp.mtime_ns,
                "gzip": inp.gz,
                "layout": "labelled" if inp.has_label else "unlabelled",
                "chunks": len(recs),
                "lines": sum(r["lines"] for r in recs),
                "rows": sum(r["rows"] for r in recs),
                "bad_lines": bad,
                "truncated": next((r["truncated"] for r in recs if r.get("truncated")), None),
            }
        )
        for r in recs:
            for o in r["outputs"]:
                outputs.append({**o, "input": inp.path, "chunk": r["chunk"]})
                s = splits.setdefault(o["split"], {"rows": 0, "files": 0, "bytes": 0})
                s["rows"] += o["rows"]
                s["files"] += 1
                s["bytes"] += o["bytes"]
    outputs.sort(key=lambda o: o["path"])
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings,
        "on_bad_line": cfg.on_bad_line,
        "versions": {"python": sys.version.split()[0], "pyarrow": pa.__version__, "numpy": np.__version__},
        "schema": {f.name: str(f.type) for f in tsv.SCHEMA},
        "inputs": inputs,
        "splits": dict(sorted(splits.items(), key=lambda kv: ("train", "val", "test", "all").index(kv[0]))),
        "rows": sum(i["rows"] for i in inputs),
        "bad_lines": {"count": bad_total, "examples": examples[:20]},
        "outputs": outputs,
        "vocab": None,
    }


def _build_vocab(cfg: PrepareConfig, manifest: dict[str, Any], bar: Callable[..., tqdm]) -> dict[str, Any]:
    split = "all" if cfg.split == "none" else "train"
    files = [os.path.join(cfg.output, o["path"]) for o in manifest["outputs"] if o["split"] == split]
    source = state.fingerprint({"files": [(o["path"], o["bytes"]) for o in manifest["outputs"] if o["split"] == split]})
    key = {"threshold": cfg.vocab_threshold, "partitions": cfg.vocab_partitions, "source": source}
    columns: dict[str, Any] = {}
    todo = []
    for col in vocab.COLUMNS:
        rec = state.read_json(os.path.join(cfg.output, state.PROGRESS_DIR, f"vocab.{col}.json"))
        if rec and rec.get("key") == key and os.path.exists(os.path.join(cfg.output, state.VOCAB_DIR, f"{col}.parquet")):
            columns[col] = rec["summary"]
        else:
            todo.append(col)
    if todo:
        tasks = [(cfg.output, files, col, cfg.vocab_threshold, cfg.vocab_partitions) for col in todo]
        results = _run(cfg, tasks, bar(total=len(tasks), desc="vocab", unit="col"), fn=_vocab_task_counted)
        for col, summary in zip(todo, results):
            state.write_json_atomic(
                os.path.join(cfg.output, state.PROGRESS_DIR, f"vocab.{col}.json"), {"key": key, "summary": summary}
            )
            columns[col] = summary
    columns = {c: columns[c] for c in vocab.COLUMNS}
    return {
        "threshold": cfg.vocab_threshold,
        "split": split,
        "null_value": vocab.NULL_VALUE,
        "columns": columns,
        "num_embeddings_per_feature": [columns[c]["num_embeddings"] for c in vocab.COLUMNS],
    }


def _vocab_task_counted(task: tuple[str, list[str], str, int, int]) -> dict[str, Any]:
    summary = vocab.vocab_task(task)
    report_progress(nbytes=1)
    return summary


def _print_summary(m: dict[str, Any], manifest_path: str) -> None:
    parts = [f"{name}: {s['rows']:,} rows in {s['files']} file(s)" for name, s in m["splits"].items()]
    print(f"prepare-criteo: {m['rows']:,} rows -> " + "; ".join(parts or ["no rows"]), file=sys.stderr)
    bad = m["bad_lines"]
    if bad["count"]:
        e = bad["examples"][0]
        print(f"prepare-criteo: skipped {bad['count']:,} bad line(s); first: {e['file']}:{e['line']}: {e['reason']}", file=sys.stderr)
    for i in m["inputs"]:
        if i.get("truncated"):
            t = i["truncated"]
            print(f"prepare-criteo: {t['file']}: truncated: its gzip data ends at line {t['line']:,} without an "
                  f"end-of-stream marker; kept the complete lines before the cut (--on-bad-line skip)", file=sys.stderr)
    if m.get("vocab"):
        sizes = ",".join(str(n) for n in m["vocab"]["num_embeddings_per_feature"])
        print(f"prepare-criteo: vocab tables (ids + 1 for rare): data.num_embeddings_per_feature={sizes}", file=sys.stderr)
    print(f"prepare-criteo: done in {m['seconds']:.1f} s; see {manifest_path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
