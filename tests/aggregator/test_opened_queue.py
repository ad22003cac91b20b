"""The decider's queue hands over the opened run at its head, in order, and nothing it must not decide yet."""

from __future__ import annotations

import asyncio

from aggregator.opened_queue import OpenedQueue
from aggregator.opener import Opened


def test_opened_behind_takes_the_opened_plain_updates_at_the_head_and_stops_at_the_first_other():
    async def run() -> None:
        loop = asyncio.get_running_loop()
        q = OpenedQueue(maxsize=16)
        futs = [loop.create_future() for _ in range(6)]
        for f in futs:
            q.put_nowait(f)
        ops = [Opened(b"", msg_id=f"m{i}") for i in range(6)]
        futs[0].set_result(ops[0])
        futs[1].set_result(ops[1])
        futs[3].set_result(ops[3])  # opened, but behind one still opening: waits its turn
        assert q.opened_behind() == [ops[0], ops[1]]
        assert q.opened_behind() == []  # the head is still being opened
        futs[2].set_result(Opened(b"", msg_id="cohort", secagg=True))
        assert q.opened_behind() == []  # a cohort submission goes its own way (the decider takes it)
        assert (await q.get()) is futs[2]
        futs[4].set_exception(RuntimeError("a bug while opening"))
        assert q.opened_behind(limit=5) == [ops[3]]  # the failure stays for the decider to log
        assert q.qsize() == 2 and (await q.get()) is futs[4]
        futs[5].set_result(ops[5])
        assert q.opened_behind(limit=0) == [] and q.opened_behind(limit=1) == [ops[5]]

    asyncio.run(run())


def test_received_behind_waits_for_the_updates_being_opened_and_stops_at_the_first_other():
    """The decider's group takes the updates queued behind it even while they are still being opened (opened_behind
    stopped at the first of those, so under load most groups were of one or two updates), in order, up to its limit,
    and never a cohort submission or a failure."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        q = OpenedQueue(maxsize=16)
        futs = [loop.create_future() for _ in range(7)]
        for f in futs:
            q.put_nowait(f)
        ops = [Opened(b"", msg_id=f"m{i}") for i in range(7)]
        futs[0].set_result(ops[0])
        loop.call_later(0.02, futs[1].set_result, ops[1])  # still being opened when the group is taken
        loop.call_later(0.04, futs[2].set_result, ops[2])
        assert q.opened_behind() == [ops[0]]  # the old rule: stops at the first still being opened
        assert await q.received_behind(limit=2) == [ops[1], ops[2]]  # waited for, in order, up to the limit
        futs[3].set_result(ops[3])
        loop.call_later(0.02, futs[4].set_result, Opened(b"", msg_id="cohort", secagg=True))
        assert await q.received_behind() == [ops[3]]  # a cohort submission goes its own way (the decider takes it)
        assert (await q.get()) is futs[4]
        futs[5].set_exception(RuntimeError("a bug while opening"))
        assert await q.received_behind() == []  # the failure stays for the decider to log
        assert (await q.get()) is futs[5]
        futs[6].cancel()
        assert await q.received_behind() == [] and q.qsize() == 1
        assert q.get_nowait().cancelled() and await q.received_behind() == []  # an empty queue: nothing to await

    asyncio.run(run())
