"""On-disk state of a conversion: output names, atomic writes, per-chunk records, the lock.

Layout of an output directory::

    DIR/train/NNN-STEM.KKKKK.parquet   (and val/, test/, or all/ for --split none)
    DIR/vocab/C1.parquet ...            (only with --vocab-threshold)
    DIR/manifest.json                   (written last: present <=> the last run completed)
    DIR/_progress/settings.json         (what the outputs were made with)
    DIR/_progress/NNN-STEM.KKKKK.json   (one record per finished chunk)
    DIR/_progress/lock                  (flock'ed while a run writes DIR)

``NNN`` is the input's position in natural sort order (``day_2`` before ``day_10``), so
that sorting the output names, as the training loader does, gives the input order; ``STEM``
is the input's name without ``.gz``/``.txt``/``.tsv``; ``KKKKK`` the chunk index. Names
depend only on (input, chunk), so reruns line up with earlier runs.

Safety: every file is written under a hidden temporary name (``.NAME.PID.tmp``, which
neither ``*.parquet`` globs nor the loader pick up) and renamed when complete, so a file
under its final name is always whole. A chunk counts as done only once its record exists
and everything it lists is present with the recorded size; the record is written after
the outputs are renamed. An interrupted chunk is therefore redone on the next run.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from deepfm_dist import fsutil
from deepfm_dist.prepare.errors import PrepareError

PROGRESS_DIR = "_progress"
MANIFEST = "manifest.json"
VOCAB_DIR = "vocab"
SPLIT_DIRS = ("train", "val", "test", "all")
TMP_SUFFIX = ".tmp"


def natural_key(path: str) -> list[Any]:
    """Sort key that orders digit runs by value: day_2 < day_10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def input_prefix(index: int, path: str, width: int) -> str:
    """``NNN-STEM`` naming the outputs of the ``index``-th input."""
    stem = os.path.basename(path)
    for ext in (".gz", ".txt", ".tsv", ".csv"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
    stem = re.sub(r"[^A-Za-z0-9_.+-]", "_", stem) or "input"
    return f"{index:0{width}d}-{stem}"


def chunk_name(prefix: str, chunk: int) -> str:
    return f"{prefix}.{chunk:05d}"


def output_path(out_dir: str, split: str, prefix: str, chunk: int) -> str:
    return os.path.join(out_dir, split, chunk_name(prefix, chunk) + ".parquet")


def record_path(out_dir: str, prefix: str, chunk: int) -> str:
    return os.path.join(out_dir, PROGRESS_DIR, chunk_name(prefix, chunk) + ".json")


def tmp_path(final: str) -> str:
    d, name = os.path.split(final)
    return os.path.join(d, f".{name}.{os.getpid()}{TMP_SUFFIX}")


def write_json_atomic(path: str, obj: Any) -> None:
    """``fsutil.write_json_atomic`` with this module's temporary names (``remove_stale_temps``
    finds those a killed run left)."""
    fsutil.write_json_atomic(path, obj, indent=1, tmp=tmp_path(path))


def read_json(path: str) -> Any | None:
    """The JSON in ``path``, or None if it is missing or unreadable (e.g. cut short)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def record_is_complete(out_dir: str, record: dict[str, Any] | None, *, fp: str, size: int, mtime_ns: int) -> bool:
    """A chunk record that matches these settings and input, whose outputs are all intact."""
    if not record or record.get("fingerprint") != fp:
        return False
    if record.get("input_size") != size or record.get("input_mtime_ns") != mtime_ns:
        return False
    for out in record.get("outputs", []):
        try:
            if os.path.getsize(os.path.join(out_dir, out["path"])) != out["bytes"]:
                return False
        except OSError:
            return False
    return True


def remove_chunk(out_dir: str, prefix: str, chunk: int) -> None:
    """Deletes a chunk's record, then its outputs in every split (record first: see module doc)."""
    _unlink(record_path(out_dir, prefix, chunk))
    for split in SPLIT_DIRS:
        _unlink(output_path(out_dir, split, prefix, chunk))


def chunks_on_disk(out_dir: str, prefix: str) -> set[int]:
    """Chunk indices of ``prefix`` that have a record or an output file."""
    found = set()
    pattern = re.compile(re.escape(prefix) + r"\.(\d{5,})\.(?:json|parquet)$")
    dirs = [PROGRESS_DIR, *SPLIT_DIRS]
    for d in dirs:
        for path in glob.glob(os.path.join(glob.escape(os.path.join(out_dir, d)), glob.escape(prefix) + ".*")):
            m = pattern.search(os.path.basename(path))
            if m:
                found.add(int(m.group(1)))
    return found


def remove_stale_temps(out_dir: str) -> int:
    """Deletes temporary files left by killed runs; returns how many."""
    n = 0
    for d in (PROGRESS_DIR, VOCAB_DIR, *SPLIT_DIRS):
        for path in glob.glob(os.path.join(glob.escape(os.path.join(out_dir, d)), ".*" + TMP_SUFFIX)):
            _unlink(path)
            n += 1
    for path in glob.glob(os.path.join(glob.escape(out_dir), ".*" + TMP_SUFFIX)):
        _unlink(path)
        n += 1
    return n


@contextmanager
def locked(out_dir: str) -> Iterator[None]:
    """Holds an exclusive lock on ``out_dir`` (two runs writing one directory would clash)."""
    path = os.path.join(out_dir, PROGRESS_DIR, "lock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise PrepareError(
                    f"{out_dir}: another prepare-criteo run holds {path}; wait for it to finish "
                    f"or use another --output"
                ) from None
            raise
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
