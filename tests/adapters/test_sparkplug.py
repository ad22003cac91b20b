"""Sparkplug B through a real Mosquitto: BIRTH then DATA decoded by alias, seq gaps -> rebirth."""
from __future__ import annotations

import asyncio
from urllib.parse import urlparse

import aiomqtt
import pytest

from firmware_adapters import build_source
from firmware_adapters.sparkplug import sparkplug_b_pb2 as pb
from firmware_adapters.sparkplug.codec import build_payload, metric_value, set_metric_value

G, N = "plant1", "line7"


def node_birth(seq: int) -> bytes:
    return build_payload([
        ("bdSeq", None, pb.Int64, 0),
        ("Node Control/Rebirth", None, pb.Boolean, False),
        ("Temperature", 1, pb.Double, 21.5),
        ("Count", 2, pb.Int32, -5),
    ], seq=seq, timestamp_ms=1_700_000_000_000)


def device_birth(seq: int) -> bytes:
    return build_payload([("Pressure", 3, pb.Float, 1.25), ("Running", 4, pb.Boolean, True),
                          ("Batch", 5, pb.String, "B-17")], seq=seq)


def by_alias(seq: int, items: list[tuple[int, object]], types: dict[int, int]) -> bytes:
    """A DATA payload with aliases only (no names, no datatypes), as edge nodes send them."""
    p = pb.Payload(seq=seq, timestamp=1_700_000_001_000)
    for alias, value in items:
        m = p.metrics.add()
        m.alias = alias
        set_metric_value(m, types[alias], value)
        m.ClearField("datatype")
    return p.SerializeToString()


TYPES = {1: pb.Double, 2: pb.Int32, 3: pb.Float, 4: pb.Boolean}


def test_codec_signed_integers_round_trip() -> None:
    for dt, v in [(pb.Int8, -128), (pb.Int16, -2), (pb.Int32, -123456), (pb.Int64, -(2**40)), (pb.UInt32, 2**32 - 1),
                  (pb.UInt64, 2**64 - 1), (pb.Float, 0.5), (pb.Boolean, True), (pb.Text, "x")]:
        p = pb.Payload.FromString(build_payload([("m", None, dt, v)]))
        assert metric_value(p.metrics[0], dt) == v


async def test_birth_then_data_decoded_by_alias_and_gap_triggers_rebirth(plain_mosquitto: str) -> None:
    source = build_source({"kind": "sparkplug", "name": "sp", "url": plain_mosquitto, "group_id": G,
                           "rebirth_min_interval_s": 0.0, "reconnect_initial_s": 0.05, "reconnect_max_s": 0.5})
    u = urlparse(plain_mosquitto)
    agen = source.__aiter__()
    first = asyncio.create_task(agen.__anext__())
    await asyncio.wait_for(source.ready.wait(), 10)
    async with aiomqtt.Client(u.hostname, u.port, identifier="edge-node") as edge:
        await edge.subscribe(f"spBv1.0/{G}/NCMD/{N}", qos=0)

        async def pub(mtype: str, payload: bytes, device: str | None = None) -> None:
            await edge.publish(f"spBv1.0/{G}/{mtype}/{N}" + (f"/{device}" if device else ""), payload, qos=0)

        try:
            await pub("NBIRTH", node_birth(0))
            s = await asyncio.wait_for(first, 10)
            assert s.source == f"sp/{G}/{N}" and s.ts == 1_700_000_000.0
            assert s.values == {"Temperature": 21.5, "Count": -5}  # bdSeq and Node Control/* are not tags
            await pub("DBIRTH", device_birth(1), "press")
            s = await asyncio.wait_for(agen.__anext__(), 5)
            assert s.source == f"sp/{G}/{N}/press" and s.values == {"Pressure": 1.25, "Running": True, "Batch": "B-17"}
            await pub("NDATA", by_alias(2, [(1, 22.0), (2, -7)], TYPES))
            s = await asyncio.wait_for(agen.__anext__(), 5)
            assert s.values == {"Temperature": 22.0, "Count": -7}
            await pub("DDATA", by_alias(3, [(3, 1.5), (4, False)], TYPES), "press")
            s = await asyncio.wait_for(agen.__anext__(), 5)
            assert s.values == {"Pressure": 1.5, "Running": False} and s.source.endswith("/press")
            assert source.stats.gaps == 0 and source.stats.reads == 4

            # seq 4 and 5 are lost: the reader counts the gap and asks for a rebirth
            await pub("NDATA", by_alias(6, [(1, 23.0)], TYPES))
            s = await asyncio.wait_for(agen.__anext__(), 5)
            assert s.values == {"Temperature": 23.0}  # the aliases still hold
            assert source.stats.gaps == 1 and source.stats.skipped == 2
            cmd = await asyncio.wait_for(anext(aiter(edge.messages)), 5)
            req = pb.Payload.FromString(cmd.payload)
            assert str(cmd.topic) == f"spBv1.0/{G}/NCMD/{N}"
            assert [(m.name, m.boolean_value) for m in req.metrics] == [("Node Control/Rebirth", True)]
            assert source.stats.extra["rebirth_requests"] == 1

            # an alias nobody announced, and a payload that is not protobuf: counted, not fatal
            await pub("NDATA", by_alias(7, [(99, 1.0)], {99: pb.Double}))
            s = await asyncio.wait_for(agen.__anext__(), 5)
            assert not s.good and "unknown alias" in (s.error or "")
            await pub("NDATA", b"\xff\x00not protobuf")
            s = await asyncio.wait_for(agen.__anext__(), 5)
            assert not s.good and "undecodable" in (s.error or "")
            await asyncio.wait_for(anext(aiter(edge.messages)), 5)  # second rebirth request (unknown alias)

            # the node is reborn: a new alias table replaces the old one
            await pub("NBIRTH", build_payload([("Humidity", 1, pb.Float, 0.5)], seq=0))
            s = await asyncio.wait_for(agen.__anext__(), 5)
            assert s.values == {"Humidity": 0.5}
            await pub("NDATA", by_alias(1, [(1, 0.25)], {1: pb.Float}))
            assert (await asyncio.wait_for(agen.__anext__(), 5)).values == {"Humidity": 0.25}
            await pub("NDEATH", build_payload([("bdSeq", None, pb.Int64, 0)]))
            s = await asyncio.wait_for(agen.__anext__(), 5)
            assert not s.good and "NDEATH" in (s.error or "")
            assert source.stats.bad_reads == 2 and source.stats.gaps == 1
        finally:
            await agen.aclose()


async def test_data_before_birth_asks_for_rebirth(plain_mosquitto: str) -> None:
    source = build_source({"kind": "sparkplug", "url": plain_mosquitto, "group_id": G, "edge_node_id": N})
    u = urlparse(plain_mosquitto)
    agen = source.__aiter__()
    first = asyncio.create_task(agen.__anext__())
    await asyncio.wait_for(source.ready.wait(), 10)
    async with aiomqtt.Client(u.hostname, u.port, identifier="edge-late") as edge:
        await edge.subscribe(f"spBv1.0/{G}/NCMD/{N}", qos=0)
        try:
            await edge.publish(f"spBv1.0/{G}/NDATA/{N}", by_alias(40, [(1, 1.0)], TYPES))
            s = await asyncio.wait_for(first, 5)
            assert not s.good and "NBIRTH was not seen" in (s.error or "")
            cmd = await asyncio.wait_for(anext(aiter(edge.messages)), 5)
            assert pb.Payload.FromString(cmd.payload).metrics[0].name == "Node Control/Rebirth"
        finally:
            await agen.aclose()


def test_reader_uses_a_clean_session() -> None:
    source = build_source({"kind": "sparkplug", "url": "mqtt://127.0.0.1:1883"})
    s = source._settings()
    assert s.clean_start is True and s.session_expiry_s == 0 and s.protocol == "5"
    with pytest.raises(Exception):
        build_source({"kind": "sparkplug", "url": "mqtt://127.0.0.1:1883", "persistent": True})


async def test_broker_restart_is_survived_and_counted(broker) -> None:
    source = build_source({"kind": "sparkplug", "url": broker.url, "group_id": G,
                           "reconnect_initial_s": 0.05, "reconnect_max_s": 0.3})
    u = urlparse(broker.url)
    agen = source.__aiter__()
    first = asyncio.create_task(agen.__anext__())
    await asyncio.wait_for(source.ready.wait(), 10)
    try:
        async with aiomqtt.Client(u.hostname, u.port) as edge:
            await edge.publish(f"spBv1.0/{G}/NBIRTH/{N}", node_birth(0))
            assert (await asyncio.wait_for(first, 5)).values["Temperature"] == 21.5
        broker.stop()
        await asyncio.sleep(0.3)
        broker.start()
        await asyncio.wait_for(source.ready.wait(), 10)
        nxt = asyncio.create_task(agen.__anext__())
        await asyncio.sleep(0.3)  # let the reader resubscribe (clean session: nothing kept by the broker)
        async with aiomqtt.Client(u.hostname, u.port) as edge:
            # the node came back too, and its seq continues from where the reader last saw it
            await edge.publish(f"spBv1.0/{G}/NDATA/{N}", by_alias(9, [(1, 30.0)], TYPES))
            s = await asyncio.wait_for(nxt, 10)
        assert s.values == {"Temperature": 30.0}
        assert source.stats.reconnects == 1 and source.stats.gaps == 1
    finally:
        await agen.aclose()
