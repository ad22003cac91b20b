"""The service's hand-off to its opening threads, in batches: what arrived while they were busy goes as one task.

Why: handing each sealed update to a pool thread and its result back to the
event loop costs CPU per update (an executor task, a future, a wake-up of the
loop through its self-pipe), about as much as a decision's SQLite at 100k
parameters. Here an update is still handed over at once when a thread is free
(no added latency on a quiet aggregator); while all ``workers`` threads are
busy, updates wait and then go together, as one task whose results come back
to the loop in one wake-up. The decider sees what it saw before: one future per
update, in arrival order, in the same bounded queue (``aggregator.opened_queue``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from aggregator.opener import Opened

OpenCall = tuple[Callable[..., Opened], tuple[Any, ...]]  # how to open one update: a function and its arguments
#: updates per task at most (as ``AggregatorCore.process_stream``'s batches)
BATCH_MAX = 4


def _open_all(calls: list[OpenCall]) -> list[tuple[Opened | None, BaseException | None]]:
    """Each call's result or exception, in order (one failure does not stop the others)."""
    out: list[tuple[Opened | None, BaseException | None]] = []
    for fn, args in calls:
        try:
            out.append((fn(*args), None))
        except Exception as exc:  # handed to that update's future, as run_in_executor would
            out.append((None, exc))
    return out


class OpenBatcher:
    """Opens updates on ``pool`` with at most ``workers`` tasks at once; used from the event loop's thread only."""

    def __init__(self, pool: Executor, workers: int, batch_max: int = BATCH_MAX) -> None:
        self.pool = pool
        self.workers = max(1, workers)
        self.batch_max = max(1, batch_max)
        self._waiting: list[tuple[asyncio.Future[Opened], OpenCall]] = []
        self._running = 0
        self.tasks = 0  # pool tasks submitted so far (for tests and the curious)

    def open(self, fn: Callable[..., Opened], *args: Any) -> asyncio.Future[Opened]:
        """A future of ``fn(*args)`` run on the pool: now if a thread is free, else with the next batch."""
        fut: asyncio.Future[Opened] = asyncio.get_running_loop().create_future()
        self._waiting.append((fut, (fn, args)))
        if self._running < self.workers:
            self._submit()
        return fut

    def _submit(self) -> None:
        batch, self._waiting = self._waiting[: self.batch_max], self._waiting[self.batch_max :]
        loop = asyncio.get_running_loop()
        self._running += 1
        self.tasks += 1
        done = loop.run_in_executor(self.pool, _open_all, [call for _, call in batch])
        done.add_done_callback(lambda d: self._finish([f for f, _ in batch], d))

    def _finish(self, futures: list[asyncio.Future[Opened]], done: asyncio.Future[Any]) -> None:
        """In the loop's thread: each update's future resolved, and the next batch handed over."""
        self._running -= 1
        if done.cancelled() or done.exception() is not None:  # the pool itself failed (shut down)
            exc = asyncio.CancelledError() if done.cancelled() else done.exception()
            results: list[tuple[Opened | None, BaseException | None]] = [(None, exc)] * len(futures)
        else:
            results = done.result()
        for fut, (opened, exc) in zip(futures, results):
            if fut.done():
                continue  # cancelled meanwhile (the service stopping)
            if exc is not None:
                fut.set_exception(exc)
            else:
                assert opened is not None
                fut.set_result(opened)
        while self._waiting and self._running < self.workers:
            self._submit()
