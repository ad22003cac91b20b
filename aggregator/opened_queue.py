"""The queue between the service's intake and its decider, and the run of opened updates a group commit takes.

Why a queue of its own: the decider decides the oldest opened update together
with those right behind it that are already opened, in one SQLite transaction
(``AggregatorCore.decide_many``), so it must look at the head of the queue
without taking it; ``asyncio.Queue`` has no peek, but its subclasses own its
``_queue`` deque (as ``asyncio.PriorityQueue`` does).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from aggregator.core import GROUP_MAX
from aggregator.opener import Opened


class OpenedQueue(asyncio.Queue["asyncio.Future[Opened]"]):
    """Futures of updates being opened, in arrival order (bounded: back-pressure on the intake)."""

    _queue: deque[Any]

    async def received_behind(self, limit: int = GROUP_MAX - 1) -> list[Opened]:
        """Up to ``limit`` plain updates at the head, each waited for while it is being opened, taken off the
        queue in order: the decider decides them with the one it holds, in one commit.

        Why wait, where :meth:`opened_behind` takes only what is opened already: these updates have arrived and
        are being opened on the other threads; a group that holds more of them commits less often and, when it
        holds a version, writes none of the buffered bytes before it (the version holds them). Deciding only what
        was opened made groups of one to a few updates under load, and a commit and an append for most updates
        (BENCHMARKS.md, "intake19g"). A receipt waits at most for the updates queued behind it to be opened.
        Stops at a cohort submission or a failure (the decider takes those itself) and at an empty queue."""
        out: list[Opened] = []
        while len(out) < limit and self._queue:
            head = self._queue[0]
            if not head.done():
                await asyncio.wait([head])
                if not self._queue or self._queue[0] is not head:
                    break  # taken meanwhile (only the decider takes: defensive)
            if head.cancelled() or head.exception() is not None or head.result().secagg:
                break
            out.append(self.get_nowait().result())
        return out

    def opened_behind(self, limit: int = GROUP_MAX - 1) -> list[Opened]:
        """Up to ``limit`` updates at the head that are opened already, plain ones (no cohort submission,
        no failure), taken off the queue in order: the decider decides them with the one it holds."""
        out: list[Opened] = []
        while len(out) < limit and self._queue:
            head = self._queue[0]
            if not head.done() or head.cancelled() or head.exception() is not None or head.result().secagg:
                break
            out.append(self.get_nowait().result())
        return out
