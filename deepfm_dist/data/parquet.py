"""Finding and opening Parquet files: local paths and any URI that ``pyarrow.fs`` understands.

``resolve_parquet_paths`` turns what the user wrote (files, directories, globs, lists of them;
``/data/x``, ``s3://bucket/criteo/*.parquet``, ``file:///data``) into a sorted list of files.
``open_parquet`` opens one of those names. The loader (``loader.ParquetLoader``) reads them.
"""

from __future__ import annotations

import functools
import glob
import os
import re
from collections.abc import Sequence

import pyarrow.fs as pafs
import pyarrow.parquet as pq

_GLOB_CHARS = set("*?[")


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` names (read through ``pyarrow.fs``), False for local paths."""
    return "://" in path


def resolve_parquet_paths(
    spec: str | os.PathLike | Sequence[str | os.PathLike], what: str
) -> list[str]:
    """Expands a path spec into the sorted list of Parquet files it names.

    Args:
        spec: a file, a directory (every ``*.parquet`` below it, skipping names that start
            with ``.`` or ``_``, i.e. hidden/temporary files and Spark/Hive markers), a glob
            (``**`` allowed), or a list of those. Each may be a local path or a URI such as
            ``s3://bucket/dir`` or ``file:///data/*.parquet`` (any scheme ``pyarrow.fs``
            knows; globs in URIs match against a recursive listing of their fixed prefix).
        what: what the spec is for, e.g. ``"data.train"``; used in error messages.

    Returns:
        Sorted, de-duplicated names: absolute paths for local paths, ``scheme://...`` for
        URIs (``file://`` URIs stay URIs and are read through ``pyarrow.fs``, like ``s3://``).

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
        matches = _resolve_uri(item) if is_uri(item) else _resolve_local(item)
        if not matches:
            where = f"{item!r}" if single else f"{item!r} (in {items!r})"
            raise FileNotFoundError(f"{what}: {where} matched no Parquet file")
        found.update(matches)
    return sorted(found)


def _resolve_local(item: str) -> list[str]:
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
    return [os.path.abspath(m) for m in matches]


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


def _visible_parquet(path: str, root: str) -> bool:
    """A ``*.parquet`` file below ``root`` with no hidden (``.``/``_``) part after ``root``."""
    rel = path[len(root) :].strip("/").split("/")
    return path.endswith(".parquet") and not any(p.startswith((".", "_")) for p in rel if p)


def _glob_regex(pattern: str) -> re.Pattern:
    """``glob`` semantics for listed paths: ``*`` and ``?`` stay within one folder and do not
    match a leading ``.``; ``**/`` matches any number of folders; ``[...]`` is a class."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        at_start = i == 0 or pattern[i - 1] == "/"
        if pattern.startswith("**/", i):
            out.append(r"(?:[^/.][^/]*/)*")
            i += 3
            continue
        if c == "*":
            out.append(r"(?:[^/.][^/]*)?" if at_start else r"[^/]*")
        elif c == "?":
            out.append(r"[^/.]" if at_start else r"[^/]")
        elif c == "[" and "]" in pattern[i + 1 :]:
            j = pattern.index("]", i + 1)
            body = pattern[i + 1 : j]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def _resolve_uri(uri: str) -> list[str]:
    scheme, rest = uri.split("://", 1)
    glob_at = min((i for i, c in enumerate(rest) if c in _GLOB_CHARS), default=-1)
    fixed = rest if glob_at < 0 else rest[: rest.rfind("/", 0, glob_at) + 1]
    try:
        fs, base = pafs.FileSystem.from_uri(f"{scheme}://{fixed}")
        info = fs.get_file_info(base)
        listing = (
            fs.get_file_info(pafs.FileSelector(base, recursive=True))
            if info.type == pafs.FileType.Directory
            else []
        )
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{uri!r}: cannot list it ({e})") from e
    files = [f.path for f in listing if f.type == pafs.FileType.File]
    if glob_at < 0:
        names = [info.path] if info.type == pafs.FileType.File else [
            f for f in files if _visible_parquet(f, base)
        ]
    else:
        pattern = _glob_regex(base.rstrip("/") + "/" + rest[len(fixed) :])
        dirs = [f.path for f in listing
                if f.type == pafs.FileType.Directory and pattern.fullmatch(f.path)]
        names = [f for f in files if pattern.fullmatch(f)]
        names += [f for d in dirs for f in files
                  if f.startswith(d + "/") and _visible_parquet(f, d)]
    # Filesystem paths -> URIs that ``open_parquet`` reopens: object stores keep the bucket
    # in the path ("bucket/key"); host-based ones (hdfs://host:port/path) do not.
    netloc = rest.split("/", 1)[0]
    head = f"{scheme}://{netloc}" if base.startswith("/") else f"{scheme}://"
    return [head + name for name in names]


@functools.lru_cache(maxsize=256)
def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(uri)


def open_parquet(path: str) -> pq.ParquetFile:
    """Opens a name returned by ``resolve_parquet_paths``; the caller closes it.

    Remote files are opened with ``pre_buffer`` (column chunks fetched in coalesced ranged
    reads, which matters on object stores); local files are read directly.
    """
    if is_uri(path):
        fs, fs_path = _filesystem(path)
        return pq.ParquetFile(fs.open_input_file(fs_path), pre_buffer=True)
    return pq.ParquetFile(path)
