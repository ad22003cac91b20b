"""The client against a broker that goes away: it reconnects and re-subscribes by
itself, a publish while the broker is down waits for it or raises NotConnected
(never hangs), and chunks are sized under the broker's MQTT 5 Maximum Packet Size."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker_bridge.client import BrokerSettings, MqttClient
from broker_bridge.errors import NotConnected
from broker_bridge.mosquitto import MosquittoProcess
from broker_bridge.topics import Topics
from fedline.testing.patience import bound
from tests.bridge import helpers as h
from tests.conftest import FEDERATION, SITES, eventually, settings_for

T = Topics("test")
pytestmark = pytest.mark.timeout(60)  # a hung broker test fails in a minute, not at the suite limit


async def _next_payload(client: MqttClient, timeout: float = 10.0) -> bytes:
    return (await asyncio.wait_for(client.messages().__anext__(), timeout)).payload


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_reconnects_and_resubscribes_after_broker_restart(mosquitto, how: str) -> None:
    # clean start: the broker forgets the subscription, so only the client's own resubscribe helps
    sub_settings = settings_for(mosquitto, "aggregator", client_id="agg-clean", clean_start=True)
    async with (
        MqttClient(sub_settings) as agg,
        MqttClient(settings_for(mosquitto, "site-a", client_id="site-a")) as site,
    ):
        await agg.wait_connected(10)
        await agg.subscribe(T.updates_filter())
        await site.publish(T.update_chunk("site-a", "before", 0), b"before")
        assert await _next_payload(agg) == b"before"

        mosquitto.stop() if how == "stop" else mosquitto.kill()
        await eventually(lambda: not agg.connected.is_set() and not site.connected.is_set())
        started = time.monotonic()
        with pytest.raises(NotConnected, match="no connection"):
            await site.publish(T.update_chunk("site-a", "lost", 0), b"lost", timeout=0.5)
        assert time.monotonic() - started < 5

        mosquitto.start()
        await eventually(lambda: agg.stats.connects >= 2 and site.stats.connects >= 2, timeout=15)
        assert agg.stats.disconnects >= 1
        await site.publish(T.update_chunk("site-a", "after", 0), b"after")
        assert await _next_payload(agg) == b"after"


async def test_publish_while_down_waits_for_the_broker(mosquitto) -> None:
    async with (
        MqttClient(settings_for(mosquitto, "aggregator", client_id="agg")) as agg,
        MqttClient(settings_for(mosquitto, "site-a", client_id="site-a")) as site,
    ):
        await agg.wait_connected(10)
        await agg.subscribe(T.updates_filter())
        await site.wait_connected(10)
        mosquitto.stop()
        await eventually(lambda: not site.connected.is_set())
        pending = asyncio.create_task(site.publish(T.update_chunk("site-a", "queued", 0), b"queued", timeout=15))
        await asyncio.sleep(0.5)
        assert not pending.done()  # waiting, not failed, not pretending success
        mosquitto.start()
        await asyncio.wait_for(pending, bound(15))
        assert await _next_payload(agg) == b"queued"


async def test_no_broker_at_all_raises_not_connected_in_time() -> None:
    from broker_bridge.mosquitto import free_port

    s = BrokerSettings(
        url=f"mqtt://127.0.0.1:{free_port()}", client_id="lonely", backoff_min_s=0.05, backoff_max_s=0.2, timeout_s=1.0
    )
    async with MqttClient(s) as c:
        with pytest.raises(NotConnected, match="ConnectionRefused|Connection refused|last error"):
            await asyncio.wait_for(c.publish("fedline/test/x", b"x"), bound(10))
        assert c.stats.connect_failures >= 1


async def test_chunks_fit_the_brokers_maximum_packet_size(tmp_path) -> None:
    broker = MosquittoProcess(tmp_path / "small", federation=FEDERATION, sites=SITES, max_packet_size=20000)
    broker.start()
    try:
        fed = h.make_federation()
        head, _tensors, blob = h.seal(fed, "site-a", 1, n_params=64 * 1024)  # ~256 KiB
        async with (
            MqttClient(settings_for(broker, "aggregator", client_id="agg")) as agg,
            MqttClient(settings_for(broker, "site-a", client_id="site-a")) as site,
        ):
            await agg.wait_connected(10)
            await agg.subscribe(T.updates_filter())
            await site.wait_connected(10)
            assert site.max_packet_size == 20000
            topic = T.update_chunk("site-a", head.msg_id, 99999)
            limit = site.chunk_limit(topic)
            assert 15000 < limit < 20000
            items = h.chunk_items(T, "site-a", head.msg_id, blob, limit)
            assert max(len(p) for _, p in items) == limit  # full-size chunks are tried, not just small ones
            rx = h.Receiver(fed)
            task = rx.start(agg)
            await site.publish_many(items)
            await eventually(lambda: rx.accepted)
            await h.stop(task)
            assert rx.accepted[0][2] == blob and not rx.rejected
            assert site.stats.disconnects == 0
    finally:
        broker.stop()


async def test_publish_over_the_maximum_packet_size_is_refused_not_a_dropped_link(tmp_path) -> None:
    """Exactly at the broker's limit goes through; one byte over is PublishRefused (0x95)
    from the client, instead of the broker cutting the connection for everyone in flight."""
    from broker_bridge.client import publish_packet_size
    from broker_bridge.errors import PublishRefused

    broker = MosquittoProcess(tmp_path / "small", federation=FEDERATION, sites=SITES, max_packet_size=20000)
    broker.start()
    try:
        async with (
            MqttClient(settings_for(broker, "aggregator", client_id="agg")) as agg,
            MqttClient(settings_for(broker, "site-a", client_id="site-a", timeout_s=3)) as site,
        ):
            await agg.wait_connected(10)
            await agg.subscribe(T.updates_filter())
            await site.wait_connected(10)
            topic = T.update_chunk("site-a", "edge", 0)
            fits = 20000
            while publish_packet_size(topic, fits, 1, True) > 20000:
                fits -= 1
            assert publish_packet_size(topic, fits, 1, True) == 20000
            await site.publish(topic, b"f" * fits)
            assert len(await _next_payload(agg)) == fits  # the broker agrees: 20000 bytes is allowed
            with pytest.raises(PublishRefused) as info:
                await site.publish(topic, b"f" * (fits + 1))
            assert info.value.reason_code == 0x95
            await site.publish(topic, b"still here")
            assert await _next_payload(agg) == b"still here"
            assert site.stats.disconnects == 0 and site.stats.connects == 1
    finally:
        broker.stop()
