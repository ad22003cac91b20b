"""Plain JSON telemetry through a real Mosquitto."""

from __future__ import annotations

import asyncio
from urllib.parse import urlparse

import aiomqtt

from fedline.testing.patience import bound
from firmware_adapters import build_source


async def test_json_telemetry_topics(plain_mosquitto: str) -> None:
    source = build_source(
        {"kind": "mqtt_json", "name": "tele", "url": plain_mosquitto, "topics": ["plant/+/telemetry"], "ts_key": "ts"}
    )
    u = urlparse(plain_mosquitto)
    agen = source.__aiter__()
    first = asyncio.create_task(agen.__anext__())
    await asyncio.wait_for(source.ready.wait(), bound(10))
    try:
        async with aiomqtt.Client(u.hostname, u.port) as dev:
            await dev.publish(
                "plant/line7/telemetry", b'{"temp": 21.5, "motor": {"rpm": 1500, "on": true}, "ts": 1700000000123}'
            )
            await dev.publish("plant/line7/telemetry", b"[1, 2, 3]")
            await dev.publish("plant/line7/telemetry", b"\xff{not json")
            await dev.publish("plant/line8/other", b'{"ignored": 1}')
            await dev.publish("plant/line8/telemetry", b'{"temp": null, "state": "idle"}')
            s = await asyncio.wait_for(first, 5)
            assert s.values == {"temp": 21.5, "motor.rpm": 1500, "motor.on": True} and s.ts == 1700000000.123
            rest = [await asyncio.wait_for(agen.__anext__(), 5) for _ in range(3)]
    finally:
        await agen.aclose()
    assert [r.good for r in rest] == [False, False, True]
    assert rest[2].values == {"temp": None, "state": "idle"}
    assert source.stats.reads == 2 and source.stats.bad_reads == 2
