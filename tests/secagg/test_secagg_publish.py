"""Secure aggregation's messages leave without each waiting for the previous one's acknowledgement, over a real
Mosquitto, at both ends: the aggregator's cohort steps (receipts, unmask requests, the announcements and their
clearing) and an edge's replies. They arrive complete and in order, and the retained topics end as published last.

Before, each publish awaited its PUBACK (``Aggregator._to_cohorts``, ``CohortLink.on_message``): one broker round
trip per message, and at the edge the receive loop (receipts, grants, model chunks) waited behind each reply.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from aggregator.secagg_cohort import Outgoing
from aggregator.service import Aggregator
from broker_bridge.client import MqttClient
from broker_bridge.topics import Topics
from edge.cohort_link import CohortLink
from edge.metrics import EdgeMetrics
from fedline.testing.patience import bound
from tests.aggregator.helpers import make_federation
from tests.aggregator.test_receipts_in_flight import InFlight
from tests.aggregator.test_service_broker import broker_table
from tests.conftest import eventually, settings_for

T = Topics("test")
SITES = ["site-a", "site-b", "site-c"]
pytestmark = pytest.mark.timeout(120)


async def _collect(client: MqttClient, into: list[tuple[str, bytes, bool]]) -> None:
    async for m in client.messages():
        into.append((m.topic, m.payload, m.retain))


async def test_a_cohort_steps_messages_are_in_flight_together_and_arrive_in_order(mosquitto, tmp_path, monkeypatch):
    fed = make_federation(tmp_path / "fed", SITES)
    cfg = fed.config(strategy='kind = "fedbuff"\nbuffer_size = 3\nrobust = "none"', broker=broker_table(mosquitto))
    cohort = T.secagg_cohort("c0ffee")
    requests = [T.secagg_request(s) for s in SITES]
    # what one cohort step hands the service: unmask requests to every member (several each), then the
    # announcement replaced and cleared on its retained topic
    step = [Outgoing(requests[i % 3], b"request %d" % i) for i in range(30)]
    step += [Outgoing(cohort, b"ann", retain=True), Outgoing(cohort, b"", retain=True)]
    step += [Outgoing(cohort, b"ann again", retain=True)]
    counter = InFlight(monkeypatch, {*requests, cohort})
    got: dict[str, list[tuple[str, bytes, bool]]] = {s: [] for s in SITES}
    agg = Aggregator(cfg)
    task = asyncio.create_task(agg.run())
    try:
        await asyncio.wait_for(agg.started.wait(), bound(30))
        async with (
            MqttClient(settings_for(mosquitto, "site-a")) as a,
            MqttClient(settings_for(mosquitto, "site-b")) as b,
            MqttClient(settings_for(mosquitto, "site-c")) as c,
        ):
            readers = []
            for site, client in zip(SITES, (a, b, c), strict=True):
                await client.wait_connected(10)
                await client.subscribe(T.secagg_request(site))
                readers.append(asyncio.create_task(_collect(client, got[site])))
            assert agg.client is not None
            await agg._to_cohorts(agg.client, lambda: step)
            await eventually(lambda: sum(len(v) for v in got.values()) == 30, 20)
            for r in readers:
                r.cancel()
        await eventually(lambda: agg.window.acknowledged >= 33, 20)
        seen: list[tuple[str, bytes, bool]] = []
        async with MqttClient(settings_for(mosquitto, "observer", clean_start=True)) as obs:
            await obs.subscribe(cohort)
            reader = asyncio.create_task(_collect(obs, seen))
            await eventually(lambda: seen, 20)
            reader.cancel()
    finally:
        agg.stop()
        await asyncio.wait_for(task, bound(20))
    for i, site in enumerate(SITES):  # every member got its requests, in the order they were made
        assert [p for _, p, _ in got[site]] == [b"request %d" % j for j in range(i, 30, 3)]
    assert seen == [(cohort, b"ann again", True)]  # the broker got the announcement's three states in order
    assert len(counter.sent) == 33
    assert counter.peak > 1  # awaited one by one (the old loop), at most one was ever in flight
    assert agg.window.failed == 0


class _Cohorts:
    """The member's protocol state, reduced to what the link asks of it: each message gets a numbered reply."""

    def __init__(self) -> None:
        self.n = 0

    def route(self, kind: str, payload: bytes, cohort: str | None = None) -> tuple[bool, bytes | None]:
        self.n += 1
        return False, b"reply %d" % self.n


async def test_an_edge_replies_without_holding_its_receive_loop_and_in_order(mosquitto, monkeypatch) -> None:
    got: list[tuple[str, bytes, bool]] = []
    counter = InFlight(monkeypatch, {T.secagg_reply("site-a")})
    async with (
        MqttClient(settings_for(mosquitto, "aggregator")) as agg,
        MqttClient(settings_for(mosquitto, "site-a")) as site,
    ):
        await agg.wait_connected(10)
        await agg.subscribe(T.secagg_replies_filter())
        reader = asyncio.create_task(_collect(agg, got))
        await site.wait_connected(10)
        state = SimpleNamespace(
            cohorts=_Cohorts(), client=site, topics=T, site="site-a", metrics=EdgeMetrics("site-a"), rebased=False
        )
        link = CohortLink(state)  # type: ignore[arg-type]
        for _ in range(20):  # as the receive loop calls it: one message after another
            await link.on_message("secagg_request", b"request")
        assert link.window.started == 20
        await link.window.drain(bound(20))
        await eventually(lambda: len(got) == 20, 20)
        reader.cancel()
    assert [p for _, p, _ in got] == [b"reply %d" % i for i in range(1, 21)]
    assert link.window.acknowledged == 20 and link.window.failed == 0
    assert counter.peak > 1  # the receive loop went on while replies were in flight
    assert state.metrics.secagg_replies_unsent._value.get() == 0
