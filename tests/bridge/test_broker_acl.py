"""The generated ACL, enforced by a real Mosquitto: a site writes only under its own
``sites/<site>/`` and reads only ``model/`` and its own receipts. Under MQTT 5 a refused
publish is an error (PUBACK 0x87), not a silent success."""

from __future__ import annotations

import asyncio

import pytest

from broker_bridge.client import MqttClient
from broker_bridge.errors import PublishRefused
from broker_bridge.topics import Topics
from tests.conftest import eventually, settings_for

T = Topics("test")
pytestmark = pytest.mark.timeout(60)  # a hung broker test fails in a minute, not at the suite limit
NOT_AUTHORIZED = 0x87


async def _collect(client: MqttClient, into: list) -> None:
    async for m in client.messages():
        into.append((m.topic, m.payload))


@pytest.mark.parametrize(
    "topic",
    [
        T.update_chunk("site-b", "m1", 0),  # another site's updates
        T.status("site-b"),
        T.receipts("site-a"),  # its own receipts are the aggregator's to write
        T.fedkey("site-a"),  # and so is its key grant
        T.fedkey("site-b"),
        T.manifest(),
        T.weights_chunk(3, 0),
        "fedline/test/anything",
        "fedline/other/sites/site-a/update/m1/0",  # another federation
    ],
)
async def test_site_cannot_publish_outside_its_own_subtree(mosquitto, topic: str) -> None:
    async with (
        MqttClient(settings_for(mosquitto, "site-a", client_id="a")) as a,
        MqttClient(settings_for(mosquitto, "observer", client_id="obs")) as obs,
    ):
        await obs.wait_connected(10)
        await obs.subscribe("#")
        await a.wait_connected(10)
        with pytest.raises(PublishRefused) as info:
            await a.publish(topic, b"evil", qos=1)
        assert info.value.reason_code == NOT_AUTHORIZED
        assert info.value.topic == topic
        assert a.stats.refused == 1
        # the same client may still publish where it may: the refusal did not break the connection
        own = T.update_chunk("site-a", "ok", 0)
        await a.publish(own, b"fine")
        seen: list = []
        task = asyncio.create_task(_collect(obs, seen))
        await eventually(lambda: (own, b"fine") in seen)
        task.cancel()
        assert all(t != topic for t, _ in seen), "the refused message reached a subscriber"


async def test_mqtt311_refusals_are_silent_so_nothing_must_arrive(mosquitto) -> None:
    """Under 3.1.1 the broker acks what it drops (why fedline uses receipts): the
    publish 'succeeds' but the aggregator must still never see it."""
    async with (
        MqttClient(settings_for(mosquitto, "aggregator", client_id="agg")) as agg,
        MqttClient(settings_for(mosquitto, "site-a", client_id="a311", protocol="3.1.1")) as a,
    ):
        await agg.wait_connected(10)
        await agg.subscribe(T.updates_filter())
        seen: list = []
        task = asyncio.create_task(_collect(agg, seen))
        await a.publish(T.update_chunk("site-b", "spoof", 0), b"spoof")  # no error under 3.1.1
        await a.publish(T.update_chunk("site-a", "real", 0), b"real")
        await eventually(lambda: seen)
        await asyncio.sleep(0.2)
        task.cancel()
        assert seen == [(T.update_chunk("site-a", "real", 0), b"real")]


async def test_site_reads_only_the_model_and_its_own_receipts(mosquitto) -> None:
    async with (
        MqttClient(settings_for(mosquitto, "site-a", client_id="a")) as a,
        MqttClient(settings_for(mosquitto, "site-b", client_id="b")) as b,
        MqttClient(settings_for(mosquitto, "aggregator", client_id="agg")) as agg,
        MqttClient(settings_for(mosquitto, "observer", client_id="obs")) as obs,
    ):
        for c in (a, b, agg, obs):
            await c.wait_connected(10)
        for flt in (
            "fedline/test/#",
            T.updates_filter(),
            T.receipts("site-b"),
            T.status("site-b"),
            T.receipts("site-a"),
            T.model_filter(),
            T.fedkey("site-b"),
            T.fedkey("site-a"),
        ):
            await a.subscribe(flt)
        await obs.subscribe("fedline/test/#")
        got_a: list = []
        got_obs: list = []
        tasks = [asyncio.create_task(_collect(a, got_a)), asyncio.create_task(_collect(obs, got_obs))]
        forbidden = [
            (T.update_chunk("site-b", "m1", 0), b"b's update", b),
            (T.status("site-b"), b"online", b),
            (T.receipts("site-b"), b"b's receipt", agg),
            (T.fedkey("site-b"), b"b's key grant", agg),
        ]
        for topic, payload, who in forbidden:
            await who.publish(topic, payload)
        await eventually(lambda: len(got_obs) >= len(forbidden))  # they were really published
        await agg.publish(T.receipts("site-a"), b"a's receipt")
        await agg.publish(T.manifest(), b"manifest")
        await agg.publish(T.fedkey("site-a"), b"a's key grant")
        await eventually(lambda: {p for _, p in got_a} >= {b"a's receipt", b"manifest", b"a's key grant"})
        await asyncio.sleep(0.3)
        for t in tasks:
            t.cancel()
        # (overlapping filters may deliver a permitted message more than once; that is MQTT)
        assert {p for _, p in got_a} == {b"a's receipt", b"manifest", b"a's key grant"}


async def test_observer_cannot_write_and_anonymous_cannot_connect(mosquitto) -> None:
    async with MqttClient(settings_for(mosquitto, "observer", client_id="obs")) as obs:
        await obs.wait_connected(10)
        with pytest.raises(PublishRefused):
            await obs.publish(T.manifest(), b"x")
    s = settings_for(mosquitto, "site-a", client_id="nobody")
    from dataclasses import replace

    for bad in (replace(s, username=None, password=None), replace(s, password="wrong")):
        async with MqttClient(bad) as c:
            await eventually(lambda: c.stats.connect_failures >= 2)
            assert not c.connected.is_set() and c.stats.connects == 0
            assert c.last_error
