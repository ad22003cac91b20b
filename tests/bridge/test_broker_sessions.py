"""Persistent sessions on a real Mosquitto: a subscriber that is away while QoS 1
messages are published gets every one of them when it comes back, under MQTT 5
and 3.1.1, and also when the broker restarts in between (persistence on)."""

from __future__ import annotations

import asyncio

import pytest

from broker_bridge.client import MqttClient
from broker_bridge.topics import Topics
from tests.conftest import eventually, settings_for

T = Topics("test")
pytestmark = pytest.mark.timeout(60)  # a hung broker test fails in a minute, not at the suite limit
N = 40


async def _drain(client: MqttClient, into: list[bytes], until: int, timeout: float = 15.0) -> None:
    async def pull() -> None:
        async for m in client.messages():
            into.append(m.payload)
            if len(into) >= until:
                return

    await asyncio.wait_for(pull(), timeout)


async def _offline_then_back(broker, protocol: str, restart_broker: bool) -> list[bytes]:
    """The aggregator subscribes, goes away, site-a publishes N updates, the broker
    maybe restarts, the aggregator comes back with the same client id."""
    agg_settings = settings_for(
        broker, "aggregator", client_id=f"agg-persistent-{protocol}", protocol=protocol, clean_start=False
    )
    async with MqttClient(agg_settings) as agg:
        await agg.wait_connected(10)
        await agg.subscribe(T.updates_filter(), qos=1)
    # the aggregator is now offline; its session (and subscription) stays at the broker
    sent = [f"update {i}".encode() for i in range(N)]
    async with MqttClient(settings_for(broker, "site-a", client_id="site-a-pub", protocol=protocol)) as site:
        await site.publish_many([(T.update_chunk("site-a", f"m{i}", 0), p) for i, p in enumerate(sent)], qos=1)
        assert site.stats.published == N
    if restart_broker:
        broker.restart()
    received: list[bytes] = []
    async with MqttClient(agg_settings) as agg:
        await agg.wait_connected(10)
        await _drain(agg, received, N)
        await asyncio.sleep(0.2)  # anything beyond N would be a duplicate
        while (m := agg.get_nowait()) is not None:
            received.append(m.payload)
    assert sorted(received) == sorted(sent)
    return received


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_offline_subscriber_gets_every_qos1_message(mosquitto, protocol: str) -> None:
    received = await _offline_then_back(mosquitto, protocol, restart_broker=False)
    assert received == [f"update {i}".encode() for i in range(N)]  # in order, too


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_offline_messages_survive_a_broker_restart(mosquitto, protocol: str) -> None:
    assert mosquitto.config.persistence
    await _offline_then_back(mosquitto, protocol, restart_broker=True)
    assert (mosquitto.workdir / "data" / "mosquitto.db").exists()


async def test_clean_start_subscriber_gets_nothing_it_missed(mosquitto) -> None:
    """The contrast that shows the tests above measure the session, not luck."""
    s = settings_for(mosquitto, "aggregator", client_id="agg-clean", clean_start=True)
    async with MqttClient(s) as agg:
        await agg.wait_connected(10)
        await agg.subscribe(T.updates_filter())
    async with MqttClient(settings_for(mosquitto, "site-a", client_id="site-a-pub")) as site:
        await site.publish(T.update_chunk("site-a", "missed", 0), b"missed")
    async with MqttClient(s) as agg:
        await agg.wait_connected(10)
        await agg.subscribe(T.updates_filter())
        async with MqttClient(settings_for(mosquitto, "site-a", client_id="site-a-pub")) as site:
            await site.publish(T.update_chunk("site-a", "live", 0), b"live")
        got = []
        await eventually(lambda: (m := agg.get_nowait()) is not None and got.append(m.payload) is None)
        await asyncio.sleep(0.2)
        assert got == [b"live"] and agg.get_nowait() is None
