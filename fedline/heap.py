"""Keep freed multi-megabyte buffers in the process heap instead of handing them back to the kernel.

Why: every update the aggregator opens passes through a handful of fresh
buffers the size of the update (the reassembled message, the plaintext, the
decoded tensors, a forward's plaintext and ciphertext, MQTT's packet copies).
glibc serves each buffer over 128 KiB with its own ``mmap`` and returns it
with ``munmap`` when freed, so the next update's buffers start as untouched
pages: one page fault (and a zeroed page) per 4 KiB, about 1,000 per 4 MB
buffer, every time. Measured on the intake path of a 1M-parameter update
(reassemble, open, forward, reopen): 41 ms of CPU per update with glibc's
defaults, 25 ms with the thresholds below. The cost is memory that is not
returned between updates: the process keeps its peak working set (a few times
the largest update), which it needed anyway at its busiest.

Only glibc has ``mallopt``; elsewhere (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("fedline.heap")

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
#: glibc's ceiling for the mmap threshold on 64-bit (4 * 1024 * 1024 * sizeof(long)): larger buffers still use mmap
MAX_HEAP_BUFFER = 32 * 1024 * 1024


def keep_freed_buffers(max_buffer: int = MAX_HEAP_BUFFER) -> bool:
    """Serve buffers up to ``max_buffer`` bytes from the heap and do not trim it below 8x that; True if applied."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: its allocator decides
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, max_buffer) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, 8 * max_buffer) == 1 and ok
    ok = mallopt(_M_TOP_PAD, max_buffer // 2) == 1 and ok
    if not ok:
        log.debug("mallopt refused a heap threshold: glibc's defaults stay")
    return ok


__all__ = ["MAX_HEAP_BUFFER", "keep_freed_buffers"]
