"""``broker_bridge.publish_window.PublishWindow`` against a real Mosquitto: many publishes in flight at once, handed
to the broker in call order (a retained topic ends with the last value), bounded, and every message either
acknowledged or counted and reported (refused by the ACL, no connection until a stop)."""

from __future__ import annotations

import asyncio

import pytest

from broker_bridge.client import MqttClient
from broker_bridge.errors import NotConnected, PublishRefused
from broker_bridge.publish_window import PublishWindow
from broker_bridge.topics import Topics
from fedline.testing.patience import bound
from tests.conftest import eventually, settings_for

T = Topics("test")
pytestmark = pytest.mark.timeout(90)  # a hung broker test fails in 90 s, not at the suite limit


async def _collect(client: MqttClient, into: list[tuple[str, bytes, bool]]) -> None:
    async for m in client.messages():
        into.append((m.topic, m.payload, m.retain))


async def _retained(broker, topic: str) -> bytes:
    """What a fresh subscriber gets as ``topic``'s retained message."""
    seen: list[tuple[str, bytes, bool]] = []
    async with MqttClient(settings_for(broker, "observer", clean_start=True)) as obs:
        await obs.wait_connected(10)
        await obs.subscribe(topic)
        task = asyncio.create_task(_collect(obs, seen))
        await eventually(lambda: seen, 10)
        task.cancel()
    assert seen[0][2], "not a retained copy"
    return seen[0][1]


@pytest.mark.parametrize("limit", [1024, 4])
async def test_many_in_flight_in_call_order_bounded_and_all_acknowledged(mosquitto, limit: int) -> None:
    failures: list[tuple[str, str, BaseException]] = []
    window = PublishWindow(limit, on_failure=lambda *f: failures.append(f))
    request, cohort = T.secagg_request("site-a"), T.secagg_cohort("c0ffee")
    got: list[tuple[str, bytes, bool]] = []
    async with (
        MqttClient(settings_for(mosquitto, "aggregator")) as agg,
        MqttClient(settings_for(mosquitto, "site-a")) as site,
    ):
        await site.wait_connected(10)
        await site.subscribe(request)
        task = asyncio.create_task(_collect(site, got))
        await agg.wait_connected(10)
        for i in range(200):
            await window.publish(agg, request, b"%d" % i, what=f"request {i}")
            # a retained announcement replaced 50 times on one topic: the broker keeps the last one it got
            if i % 4 == 0:
                await window.publish(agg, cohort, b"ann %d" % (i // 4), retain=True)
        assert window.started == 250
        await window.drain(bound(30))
        await eventually(lambda: len(got) == 200, 20)
        task.cancel()
    assert [p for _, p, _ in got] == [b"%d" % i for i in range(200)]  # in the order published
    assert window.acknowledged == 250 and window.failed == 0 and not failures and len(window) == 0
    assert 1 < window.peak <= limit  # awaited one by one, the peak would be 1
    assert await _retained(mosquitto, cohort) == b"ann 49"


async def test_a_refused_publish_is_counted_and_reported_and_the_rest_still_go(mosquitto) -> None:
    failures: list[tuple[str, str, BaseException]] = []
    window = PublishWindow(on_failure=lambda *f: failures.append(f))
    own, other = T.secagg_reply("site-a"), T.secagg_reply("site-b")  # site-b's topic: the ACL refuses it
    got: list[tuple[str, bytes, bool]] = []
    async with (
        MqttClient(settings_for(mosquitto, "aggregator")) as agg,
        MqttClient(settings_for(mosquitto, "site-a")) as site,
    ):
        await agg.wait_connected(10)
        await agg.subscribe(T.secagg_replies_filter())
        task = asyncio.create_task(_collect(agg, got))
        await site.wait_connected(10)
        for i in range(6):
            await window.publish(site, other if i == 3 else own, b"%d" % i, what=f"reply {i}")
        await window.drain(bound(30))
        await eventually(lambda: len(got) == 5, 20)
        await asyncio.sleep(0.2)
        task.cancel()
    assert [p for _, p, _ in got] == [b"0", b"1", b"2", b"4", b"5"]
    assert window.acknowledged == 5 and window.failed == 1
    [(topic, what, exc)] = failures
    assert (topic, what) == (other, "reply 3")
    assert isinstance(exc, PublishRefused) and exc.reason_code == 0x87


async def test_without_a_connection_messages_wait_in_order_and_a_stop_counts_what_is_left(mosquitto) -> None:
    failures: list[tuple[str, str, BaseException]] = []
    window = PublishWindow(on_failure=lambda *f: failures.append(f))
    topic = T.secagg_survivors("c0ffee")
    async with MqttClient(settings_for(mosquitto, "aggregator", timeout_s=20.0)) as agg:
        await agg.wait_connected(10)
        mosquitto.stop()
        await eventually(lambda: not agg.connected.is_set())
        for i in range(5):  # returns at once: queued for the connection, not failed, not waited for
            await window.publish(agg, topic, b"s%d" % i, retain=True)
        assert len(window) == 5 and window.failed == 0
        mosquitto.start()
        await eventually(lambda: window.acknowledged == 5, 20)  # handed in order once the broker is back
        assert await _retained(mosquitto, topic) == b"s4"

        mosquitto.stop()
        await eventually(lambda: not agg.connected.is_set())
        for i in range(3):
            await window.publish(agg, topic, b"lost %d" % i, retain=True, what=f"lost {i}")
        assert await window.drain(0.2) == 3  # the stop gives up on them: counted and reported, not dropped silently
    assert window.failed == 3 and window.acknowledged == 5 and len(window) == 0
    assert [w for _, w, _ in failures] == ["lost 0", "lost 1", "lost 2"]
    assert all(isinstance(e, NotConnected) for _, _, e in failures)
