"""Huge pages for the embedding kernels' tensors (deepfm_dist/hugepages.py)."""

from __future__ import annotations

import sys

import pytest
import torch

from deepfm_dist.hugepages import HUGE_PAGE, advise_huge_pages, aligned_range, huge_page_bytes


def test_aligned_range_keeps_whole_huge_pages_inside_the_buffer():
    assert aligned_range(0, 3 * HUGE_PAGE) == (0, 3 * HUGE_PAGE)
    assert aligned_range(1, 3 * HUGE_PAGE) == (HUGE_PAGE, 3 * HUGE_PAGE)  # never past the end
    assert aligned_range(HUGE_PAGE - 8, HUGE_PAGE) == (HUGE_PAGE, HUGE_PAGE)  # no whole page: empty
    start, end = aligned_range(12345, 10 * HUGE_PAGE)
    assert start % HUGE_PAGE == 0 and end % HUGE_PAGE == 0 and 12345 <= start < end <= 12345 + 10 * HUGE_PAGE


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unavailable"


@pytest.mark.skipif(not sys.platform.startswith("linux") or _thp_mode() in ("never", "unavailable"),
                    reason="needs Linux transparent huge pages (madvise or always)")
def test_a_large_storage_is_advised_once_and_keeps_its_values():
    table = torch.randn(3_000_000, 4)  # ~46 MiB, written in 4 KiB pages first
    before = table.clone()
    small = torch.randn(1000)
    before_huge = huge_page_bytes()
    # Two views of one storage count once; the small tensor and a sparse one are skipped.
    result = advise_huge_pages([table, table[10:], small, torch.eye(3).to_sparse()])
    start, end = aligned_range(table.untyped_storage().data_ptr(), table.untyped_storage().nbytes())
    assert result.advised_bytes == end - start > 0
    assert torch.equal(table, before)  # moving pages never changes the data
    if result.collapsed_bytes:  # MADV_COLLAPSE worked (Linux 6.1+, memory not too fragmented)
        assert result.collapsed_bytes == result.advised_bytes
        assert huge_page_bytes() - before_huge >= result.collapsed_bytes // 2
    table.mul_(2)  # still an ordinary, writable tensor
    assert torch.equal(table, before * 2)


def test_nothing_small_is_advised():
    assert advise_huge_pages([torch.randn(100, 16)]).advised_bytes == 0
