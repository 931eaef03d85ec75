"""What a benchmark report says about where it ran: CPU model and code commit.

Standard library only: the converter benchmark (``prepare/bench.py``) measures peak RSS in its
own process and must not import torch to print these.
"""

from __future__ import annotations

import os
import platform
import subprocess


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    """Short commit of the working tree, ``+dirty`` when tracked files differ from it; ``n/a``
    outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=here, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=here, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "n/a"
    if head.returncode != 0:
        return "n/a"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
