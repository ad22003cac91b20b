"""A service's start with the cyclic garbage collector paused, and what the start built kept out of its reach.

Why: an edge agent's start imports torch and Opacus and builds its state: about 480,000 objects the collector
tracks, nearly all of which live as long as the process. Their allocations drive the collector's thresholds, so
during the start it walks the young objects some 780 times, the middle generation some 70 times and the whole
growing heap 6 times, and finds almost nothing to free. Measured on the 2-vCPU VM (1 Dec 2026, one edge's start
in-process, the machine loaded by other work): CPU from the start to the end of the first round 6.5 s with the
collector running, 5.9-6.0 s paused and frozen (BENCHMARKS.md, "Cheaper edge start-up").

Paused alone, the collection is only put off: the first full collection after the start walks all of it, and
made the round after the start about 0.3 s dearer. So at the end of the start :func:`gc.freeze` moves every object
that exists to the permanent generation, which collections never walk (what the standard library documents it
for); the collector then runs as before on what the process allocates afterwards. An object of the start that
becomes cyclic garbage later is not reclaimed: the start's temporaries are freed by reference counting as they go,
the rest lives as long as the process anyway.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Run the block with the cyclic collector off, then freeze what exists and switch it back on (if it was)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


__all__ = ["collector_paused"]
