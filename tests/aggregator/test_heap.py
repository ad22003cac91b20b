"""fedline.heap: the aggregator's processes keep update-sized buffers in the heap (glibc's mallopt)."""

from __future__ import annotations

import platform
import resource

import pytest

from fedline.heap import keep_freed_buffers


def _one_update() -> None:
    held = [bytearray(4 << 20) for _ in range(4)]  # a 1M-parameter update's buffers, alive together, then freed
    del held


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_freed_update_sized_buffers_are_reused_without_new_page_faults() -> None:
    assert keep_freed_buffers() is True
    _one_update()  # the first update faults its pages in once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        _one_update()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # with glibc's defaults the heap is trimmed after each update: about 80,000 faults for these 20 (measured)
    assert faults < 2000, faults
