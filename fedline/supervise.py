"""Run a service's asyncio tasks until it is asked to stop or one of them fails: the one service runtime.

Why one helper: the aggregator, each intake worker, the edge agent and a plant's uplink run a
handful of forever-tasks around one broker connection. Each must end on ``stop``, end (raising)
when a task fails, never hang while unwinding, and say ``stopped`` on its liveness topic on the
way out. Written once here, so a fix reaches every service: the bounded join below exists
because Python 3.11's ``asyncio.wait_for`` can swallow a cancellation that arrives in the same
step as its result, which once left an edge's status loop running after shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from fedline.logs import event

log = logging.getLogger("fedline.supervise")

JOIN_ROUND_S = 5.0  # a task still running this long after its cancellation is named in the log
JOIN_ROUNDS = 12  # ... and cancelled again, for at most a minute


async def join_cancelled(tasks: Iterable[asyncio.Task[Any]], service: str, **fields: Any) -> None:
    """Wait for cancelled ``tasks``, bounded: a task still running is logged (``<service>.task_stuck``,
    with where it is) and cancelled again every :data:`JOIN_ROUND_S` seconds, for at most a minute."""
    pending: set[asyncio.Task[Any]] = set(tasks)
    for _ in range(JOIN_ROUNDS):
        if not pending:
            return
        _, pending = await asyncio.wait(pending, timeout=JOIN_ROUND_S)
        for t in pending:
            frames = "; ".join(f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in t.get_stack())
            event(log, f"{service}.task_stuck", logging.ERROR, task=t.get_name(), at=frames, **fields)
            t.cancel()


async def run_until_stopped(
    tasks: Iterable[asyncio.Task[Any]],
    stop: asyncio.Event,
    farewell: Callable[[], Awaitable[None]] | None = None,
    *,
    service: str = "service",
    **fields: Any,
) -> None:
    """Wait for ``stop`` or the first task to end; re-raise a task's failure; cancel all and join them
    (:func:`join_cancelled`); then ``farewell()`` (best effort, 5 s: a last will covers a lost link)."""
    tasks = list(tasks)
    stopping = asyncio.create_task(stop.wait())
    try:
        pending: set[asyncio.Task[Any]] = {*tasks, stopping}
        while not stop.is_set():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopping and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            if not pending - {stopping}:
                break  # every task ended without an error (finite work): nothing left to supervise
    finally:
        for t in [*tasks, stopping]:
            t.cancel()
        await join_cancelled([*tasks, stopping], service, **fields)
        if farewell is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(farewell(), 5)
