"""Transparent huge pages for the embedding tables and their optimizer state on CPU.

A table lookup or fused row update touches one random row of a table of 100k-10M+ rows. With
4 KiB pages every such touch is a TLB miss and a page walk: a rank's tables (99 MiB at the
default preset, ~1.2 GiB at the Kaggle one) are far beyond what the TLB maps (~12 MiB on Zen 5
at 4 KiB). On 2 MiB pages the same tables need a few hundred TLB entries.
The gain grows with the table size (``benchmarks/hugepages_ab.py`` measures it; figures in the
benchmark reports).

Most distributions (and this machine) set THP to ``madvise``: only ranges a process asks for get
huge pages. ``advise_huge_pages`` asks for the storages of the given tensors
(``MADV_HUGEPAGE``), and, since the tables are already written (initialised) in 4 KiB pages,
has the kernel move them onto huge pages now (``MADV_COLLAPSE``, Linux 6.1+; on older kernels
khugepaged does it in the background, slowly). Only whole 2 MiB-aligned stretches inside each
storage are touched, so no neighbouring allocation changes. Elsewhere than Linux it does nothing.

Why not PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` (every allocation >= 2 MiB on huge pages): the
MLP's activations stream sequentially and do not gain, and the plain PyTorch baseline slowed
down with it. Only the random-access tables gain.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch

HUGE_PAGE = 2 * 2**20
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25


@dataclass
class HugePageResult:
    """What ``advise_huge_pages`` did: bytes of 2 MiB-aligned ranges advised, and of those the
    bytes the kernel moved onto huge pages at once (0 where MADV_COLLAPSE is unavailable or
    failed: khugepaged may still do it later); ``error`` is the first failure's message."""

    advised_bytes: int = 0
    collapsed_bytes: int = 0
    error: str = ""

    def line(self) -> str:
        if not self.advised_bytes:
            return "huge pages: nothing to advise" + (f" ({self.error})" if self.error else "")
        return (f"huge pages: {self.advised_bytes / 2**20:,.0f} MiB of tables and optimizer state advised, "
                f"{self.collapsed_bytes / 2**20:,.0f} MiB moved to 2 MiB pages now"
                + (f" ({self.error})" if self.error else ""))


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc


def aligned_range(ptr: int, nbytes: int, page: int = HUGE_PAGE) -> tuple[int, int]:
    """The largest [start, end) of whole ``page``-aligned pages inside [ptr, ptr + nbytes)
    (start == end when there is none)."""
    start = (ptr + page - 1) // page * page
    end = (ptr + nbytes) // page * page
    return start, max(start, end)


def advise_huge_pages(tensors: Iterable[torch.Tensor], min_bytes: int = 4 * HUGE_PAGE) -> HugePageResult:
    """Put the CPU storages of ``tensors`` (each once, however many views share it) that hold at
    least ``min_bytes`` on transparent huge pages. Never raises: a failure is reported in the
    result and the tensors stay as they were (on 4 KiB pages, equally correct)."""
    result = HugePageResult()
    libc = _libc()
    if libc is None:
        result.error = "not Linux"
        return result
    seen: set[int] = set()
    for t in tensors:
        if t.device.type != "cpu" or t.is_sparse:
            continue
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr in seen or nbytes < min_bytes:
            continue
        seen.add(ptr)
        start, end = aligned_range(ptr, nbytes)
        if end == start:
            continue
        if libc.madvise(ctypes.c_void_p(start), end - start, _MADV_HUGEPAGE) != 0:
            result.error = result.error or f"madvise(MADV_HUGEPAGE): {_errno_text()}"
            continue
        result.advised_bytes += end - start
        if libc.madvise(ctypes.c_void_p(start), end - start, _MADV_COLLAPSE) == 0:
            result.collapsed_bytes += end - start
        else:
            result.error = result.error or f"madvise(MADV_COLLAPSE): {_errno_text()}"
    return result


def _errno_text() -> str:
    err = ctypes.get_errno()
    return f"{os.strerror(err)} (errno {err})"


def huge_page_bytes() -> int:
    """This process's anonymous memory on huge pages (``AnonHugePages`` of
    /proc/self/smaps_rollup), 0 where unknown."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
