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

Who uses it: ``fedline edge`` (:func:`collector_paused` over its imports, the agent and ``edge.trainer.preload``)
and ``fedline aggregator`` (a :class:`StartPause` from before its imports to ``aggregator.started``: the core,
version 0 or the checkpoint, the first publish's torch and onnx, the key grants; about 280,000 objects, where the
collector had walked the young generation some 410 times, the middle 37 times and the whole heap 3 times).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


class StartPause:
    """The cyclic collector off from construction until :meth:`end`, which freezes what exists and switches it
    back on (if it was on): for a start that does not fit one ``with`` block (the aggregator's ends in its
    service loop, once it has subscribed and said so)."""

    def __init__(self) -> None:
        self._was_enabled = gc.isenabled()
        self.ended = False
        gc.disable()

    def end(self) -> int:
        """Freeze what the start built and restore the collector; idempotent. Returns the frozen count."""
        if not self.ended:
            self.ended = True
            gc.freeze()
            if self._was_enabled:
                gc.enable()
        return gc.get_freeze_count()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Run the block with the cyclic collector off, then freeze what exists and switch it back on (if it was)."""
    pause = StartPause()
    try:
        yield
    finally:
        pause.end()


__all__ = ["StartPause", "collector_paused"]
