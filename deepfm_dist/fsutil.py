"""Files written so that a reader never sees half of one."""

from __future__ import annotations

import json
import math
import os
from typing import Any


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (an AUC of a one-class set is NaN) as None: JSON has no
    NaN, and strict readers (jq, JavaScript, most other languages) refuse Python's ``NaN``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json_atomic(path: str, obj: Any, indent: int = 2, tmp: str | None = None) -> None:
    """Write ``obj`` as JSON to ``path``: a temporary file beside it (``tmp``, or a hidden name
    with this process's id), flushed to disk, then renamed over ``path``, so a crash leaves the
    old file or the new one, never a cut one."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    tmp = tmp or os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(strict_json(obj), f, indent=indent, default=str, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def finished_run_summary(run_dir: str) -> dict[str, Any] | None:
    """A run's ``summary.json`` when the run completed; None when it is missing, unreadable, or
    was written by a run that a stop signal ended (it continues with ``--resume``)."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            s = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return None if not isinstance(s, dict) or s.get("stopped_by_signal", False) else s
