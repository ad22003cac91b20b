"""The one service runtime (``fedline.supervise``): stop, failure, a task that ignores its cancellation."""

from __future__ import annotations

import asyncio
import logging

import pytest

from fedline import supervise


async def _forever() -> None:
    await asyncio.Event().wait()


async def test_stop_cancels_every_task_and_says_goodbye() -> None:
    stop, said = asyncio.Event(), []
    tasks = [asyncio.create_task(_forever(), name=f"t{i}") for i in range(3)]

    async def farewell() -> None:
        said.append("stopped")

    asyncio.get_running_loop().call_later(0.05, stop.set)
    await supervise.run_until_stopped(tasks, stop, farewell, service="test")
    assert all(t.cancelled() for t in tasks) and said == ["stopped"]


async def test_a_failing_task_ends_the_service_with_its_error() -> None:
    async def fails() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("disk gone")

    other = asyncio.create_task(_forever())
    with pytest.raises(RuntimeError, match="disk gone"):
        await supervise.run_until_stopped([asyncio.create_task(fails()), other], asyncio.Event(), service="test")
    assert other.cancelled()


async def test_a_task_that_swallows_its_cancellation_is_named_and_cancelled_again(monkeypatch, caplog) -> None:
    """The Python 3.11 ``wait_for`` case: a cancellation lost once must not hang the shutdown."""
    monkeypatch.setattr(supervise, "JOIN_ROUND_S", 0.05)
    swallowed = []

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.append(1)  # ... and carries on, as a lost cancellation does
        await asyncio.Event().wait()

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)  # it is running
    stop = asyncio.Event()
    stop.set()
    with caplog.at_level(logging.ERROR, logger="fedline.supervise"):
        await supervise.run_until_stopped([task], stop, service="edge", site="site-a")
    assert task.cancelled() and swallowed == [1]
    stuck = [r for r in caplog.records if r.getMessage() == "edge.task_stuck"]
    assert len(stuck) == 1 and stuck[0].fields["task"] == "stubborn" and stuck[0].fields["site"] == "site-a"
    assert "stubborn" in stuck[0].fields["at"]  # where it was stuck
