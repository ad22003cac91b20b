"""Run a service's asyncio tasks until it is asked to stop or one of them fails.

Why one helper: the aggregator and each intake worker run a handful of
forever-tasks around one broker connection; both must end on ``stop()``, end
(raising) when a task fails, never hang while unwinding, and say ``stopped``
on their liveness topic on the way out. Written once here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from fedline.logs import event

log = logging.getLogger("fedline.aggregator")


async def run_until_stopped(
    tasks: list[asyncio.Task[None]], stop: asyncio.Event, farewell: Callable[[], Awaitable[None]]
) -> None:
    """Wait for ``stop`` or the first task to end; re-raise a task's failure; cancel all; then ``farewell()``."""
    stopping = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([*tasks, stopping], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stopping and t.exception():
                raise t.exception()  # type: ignore[misc]
    finally:
        for t in [*tasks, stopping]:
            t.cancel()
        # bounded: stopping must not hang on a task that is slow to unwind
        _, stuck = await asyncio.wait([*tasks, stopping], timeout=10)
        for t in stuck:
            event(log, "aggregator.stop_slow", level=logging.WARNING, task=t.get_name())
        with contextlib.suppress(Exception):  # best effort: a will covers a lost link
            await asyncio.wait_for(farewell(), 5)
