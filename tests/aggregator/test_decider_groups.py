"""The service's decider ends each group commit at the version it makes and decides what it left first, next.

Regression test for the decider's group (``Aggregator._decider``, ``AggregatorCore.decide_group``): updates queued
behind a version's last one used to go into its group and had their bytes appended at its commit; now they start
the next group, and none of them may be lost, decided twice or decided out of order.
"""

from __future__ import annotations

import asyncio

import numpy as np

from aggregator.core import GROUP_MAX, AggregatorCore
from aggregator.opened_queue import OpenedQueue
from aggregator.service import Aggregator
from fedline.testing.patience import bound
from tests.aggregator.helpers import make_federation, random_delta
from tests.aggregator.test_service_broker import Site, broker_table
from tests.conftest import eventually

SITES = ["site-a", "site-b", "site-c"]


async def test_a_queued_burst_is_decided_in_groups_that_end_at_their_versions(mosquitto, tmp_path, monkeypatch):
    fed = make_federation(tmp_path / "fed", SITES)
    cfg = fed.config(
        strategy='kind = "fedbuff"\nbuffer_size = 3\nrobust = "none"\nmax_staleness = 100',
        extra="[validation]\nmax_norm = 50.0",
        broker=broker_table(mosquitto),
    )
    behind = OpenedQueue.received_behind

    async def after_the_burst(
        queue, limit=GROUP_MAX - 1
    ):  # the first group waits until the whole burst is queued behind it
        await eventually(lambda: queue.qsize() >= 6 or groups, 20)
        return await behind(queue, limit)

    monkeypatch.setattr(OpenedQueue, "received_behind", after_the_burst)
    groups: list[tuple[list[tuple[str, int]], int]] = []  # (the updates offered, how many were decided)
    decide_group = AggregatorCore.decide_group

    def recorded(core, ops):
        out = decide_group(core, ops)
        groups.append(([(op.header.site, op.header.counter) for op in ops], len(out[0])))
        return out

    monkeypatch.setattr(AggregatorCore, "decide_group", recorded)
    agg = Aggregator(cfg)
    task = asyncio.create_task(agg.run())
    try:
        await asyncio.wait_for(agg.started.wait(), bound(30))
        rng = np.random.default_rng(0)
        async with (
            Site(fed, mosquitto, "site-a") as a,
            Site(fed, mosquitto, "site-b") as b,
            Site(fed, mosquitto, "site-c") as c,
        ):
            sent = [(a, 1), (b, 1), (c, 1), (a, 2), (b, 2), (c, 2), (a, 3)]
            for site, counter in sent:  # all at once: seven queued updates, K = 3
                blob, h = fed.seal(site.site, random_delta(agg.core.model, rng), base_version=0, counter=counter)
                await site.send(blob, h.msg_id)
            await eventually(lambda: all(s.receipt(n) is not None for s, n in sent), 30)
            await eventually(lambda: sum(len(s.receipts) for s in (a, b, c)) == 7 + 4, 20)  # + 4 "applied" later
            receipts = [r for s in (a, b, c) for r in s.receipts]
    finally:
        agg.stop()
        await asyncio.wait_for(task, bound(20))
    order = [(s.site, n) for s, n in sent]
    assert groups[0] == (order, 3)  # the burst offered whole; the group ended at version 1
    assert groups[1] == (order[3:], 3)  # what it left, first: version 2
    assert groups[2] == (order[6:], 1)  # and the last one, buffered
    assert agg.core.version == 2 and [(u.site, u.counter) for u in agg.core.buffer] == [("site-a", 3)]
    applied = sorted((r["version"], r["site"], r["counter"]) for r in receipts if r["verdict"] == "applied")
    assert applied == [(v, s, v) for v in (1, 2) for s in SITES]  # each once, in its version
    assert [r["verdict"] for r in receipts if (r["site"], r["counter"]) == ("site-a", 3)] == ["buffered"]
