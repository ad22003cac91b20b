"""A decision group's receipts are published together, not one broker round trip after another.

Regression test for the decider's ceiling that `bench/scale.py` showed as a backlog growing while the machine was
far from busy (BENCHMARKS.md, "Why the backlog grew at about 64 updates/s"): every receipt's acknowledgement was
awaited before the next receipt was sent, so a FedBuff flush of K updates cost K round trips through the broker
while the opened updates behind it waited.
"""

from __future__ import annotations

import asyncio

import numpy as np

from aggregator.service import Aggregator
from broker_bridge.client import MqttClient
from broker_bridge.topics import Topics
from fedline.testing.patience import bound
from tests.aggregator.helpers import make_federation, random_delta
from tests.aggregator.test_service_broker import Site, broker_table
from tests.conftest import eventually

SITES = ["site-a", "site-b", "site-c"]


class InFlight:
    """Counts the publishes to ``topics`` handed to the broker and not yet acknowledged (every publish, awaited
    or not, is handed through ``MqttClient.hand_now``)."""

    def __init__(self, monkeypatch, topics: set[str]) -> None:
        self.topics, self.in_flight, self.peak, self.sent = topics, 0, 0, []
        hand = MqttClient.hand_now

        def counted(client, topic, payload, qos=1, retain=False, timeout=None):
            ack = hand(client, topic, payload, qos, retain, timeout)
            if topic not in self.topics:
                return ack
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.sent.append((topic, payload))

            async def acknowledged():
                try:
                    await ack
                finally:
                    self.in_flight -= 1

            return acknowledged()

        monkeypatch.setattr(MqttClient, "hand_now", counted)


async def test_a_flush_publishes_its_receipts_in_flight_together(mosquitto, tmp_path, monkeypatch):
    fed = make_federation(tmp_path / "fed", SITES)
    cfg = fed.config(
        strategy='kind = "fedbuff"\nbuffer_size = 3\nrobust = "none"',
        extra="[validation]\nmax_norm = 50.0",
        broker=broker_table(mosquitto),
    )
    receipt_topics = {Topics("test").receipts(s) for s in SITES}
    counter = InFlight(monkeypatch, receipt_topics)
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
            for site in (a, b, c):  # one after another: the first two are buffered, the third flushes all three
                blob, h = fed.seal(site.site, random_delta(agg.core.model, rng), base_version=0)
                await site.send(blob, h.msg_id)
                await eventually(lambda: site.receipt(h.counter) is not None, 20)
            for site in (a, b):  # the flush's "applied" receipts of the two buffered updates reach their sites
                await eventually(lambda: [r["verdict"] for r in site.receipts] == ["buffered", "applied"], 20)
            assert [r["verdict"] for r in c.receipts] == ["applied"]
            assert {r["version"] for r in (a.receipts[1], b.receipts[1], c.receipts[0])} == {1}
    finally:
        agg.stop()
        await asyncio.wait_for(task, bound(20))
    assert len(counter.sent) == 5  # two "buffered", then the flush's three "applied"
    # the flush's three receipts were in flight at once (awaited one by one, at most one ever was)
    assert counter.peak == 3
    assert agg.window.failed == 0 and agg.window.acknowledged >= 5
