"""Sparkplug B 3.0: Tahu-encoded vectors decoded value by value; bdSeq, STATE, rebirth and reconnects
through a real Mosquitto."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlparse

import aiomqtt
import pytest

from fedline.config import ConfigError
from fedline.netproxy import TcpProxy
from fedline.testing.patience import bound
from firmware_adapters import build_source
from firmware_adapters.sample import Sample
from firmware_adapters.sparkplug import sparkplug_b_pb2 as pb
from firmware_adapters.sparkplug.codec import build_payload, metric_value, set_metric_value

from . import sparkplug_vectors as V

G, N = "plant1", "line7"
T0 = V.T0 / 1000.0


def vectors() -> dict[str, tuple[str, bytes]]:
    doc = json.loads(V.VECTORS_FILE.read_text())
    return {v["name"]: (v["topic"], bytes.fromhex(v["payload_hex"])) for v in doc["vectors"]}


def test_committed_vectors_are_what_the_tahu_rules_encode() -> None:
    assert json.loads(V.VECTORS_FILE.read_text())["vectors"] == V.build_vectors()


def view(s: Sample) -> tuple:
    return (s.source, s.ts, s.quality, s.historical, dict(s.values))


async def test_tahu_vectors_decode_value_by_value() -> None:
    source = build_source({"kind": "sparkplug", "name": "sp", "group_id": G})
    vec = vectors()

    async def feed(name: str) -> list[Sample]:
        topic, payload = vec[name]
        return await source.handle(topic, payload)

    node, dev = f"sp/{G}/{N}", f"sp/{G}/{N}/press"
    good, stale, bad = await feed("nbirth")
    assert view(good) == (
        node,
        T0,
        "good",
        False,
        {
            "Temperature": 21.5,
            "Counter": 4_000_000_000,  # UInt32 in long_value, as Tahu-Java writes it
            "Offset": -5,
            "Level": -300,  # Int8 / Int16 sign-extended to 32 bits in int_value
            "Total": -(2**40),
            "Serial": 2**64 - 2,
            "Small": 200,
            "Word": 65535,
            "Ratio": 0.25,
            "Running": True,
            "Batch": "B-17",
            "Started": 1_699_990_000_000,
        },
    )  # bdSeq and Node Control/* are not tags
    assert all(type(good.values[k]) is int for k in ("Counter", "Offset", "Total", "Serial", "Started"))
    assert view(stale) == (node, T0, "uncertain", False, {"Pressure": 4.5})  # Quality 500 STALE
    assert stale.error == "Quality STALE (500): Pressure"
    assert view(bad) == (node, T0, "bad", False, {"Vibration": None})  # Quality 0 BAD: value dropped
    assert bad.error == "Quality BAD (0): Vibration"

    (s,) = await feed("dbirth")
    assert view(s) == (dev, T0 + 0.001, "good", False, {"Force": -123456, "Mode": "auto", "Cycles": 7})

    (s,) = await feed("ndata-aliases-stripped")  # no names, no datatypes: both from the births
    assert view(s) == (
        node,
        T0 + 1.998,
        "good",
        False,  # the newest metric timestamp, not the payload's
        {"Temperature": 22.0, "Counter": 2**32 - 1, "Offset": -128, "Pressure": 4.75},
    )

    h1, h2, live = await feed("ddata-historical")
    assert view(h1) == (dev, T0 - 60, "good", True, {"Force": -1})
    assert view(h2) == (dev, T0 - 30, "good", True, {"Force": -2, "Mode": "manual"})
    assert view(live) == (dev, T0 + 2.999, "good", False, {"Cycles": 8})

    (s,) = await feed("ndata-uint32-in-int-value")  # the spec table's field is accepted too
    assert view(s) == (node, T0 + 4, "good", False, {"Counter": 3_000_000_000})

    ok, wrong = await feed("ndata-wrong-field")
    assert view(ok) == (node, T0 + 5, "good", False, {"Running": False})
    assert view(wrong) == (node, T0 + 5, "bad", False, {"Temperature": None, "Small": None})  # never a silent 0
    assert "'Temperature' (Double): Double value in float_value, expected double_value" in (wrong.error or "")
    assert "'Small' (UInt8): 300 in int_value is out of range for UInt8" in (wrong.error or "")

    assert await feed("ndeath-previous-session") == []  # bdSeq 2 is not this session's 3: ignored
    assert source.stats.extra["stale_ndeath"] == 1
    dead = await feed("ndeath")
    assert [(s.source, s.quality) for s in dead] == [(node, "bad"), (dev, "bad")]
    assert all("NDEATH" in (s.error or "") for s in dead)
    topic, payload = vec["ndata-uint32-in-int-value"]
    (after,) = await source.handle(topic, payload)
    assert not after.good and "NBIRTH was not seen" in (after.error or "")

    st = source.stats
    assert (st.reads, st.bad_reads, st.gaps) == (8, 4, 0)
    assert st.extra["historical_samples"] == 2 and st.extra["wrong_field_metrics"] == 2


def test_codec_round_trip_and_range_checks() -> None:
    for dt, v in [
        (pb.Int8, -128),
        (pb.Int16, -2),
        (pb.Int32, -123456),
        (pb.Int64, -(2**40)),
        (pb.UInt32, 2**32 - 1),
        (pb.UInt64, 2**64 - 1),
        (pb.Float, 0.5),
        (pb.Boolean, True),
        (pb.Text, "x"),
        (pb.DateTime, 17),
    ]:
        p = pb.Payload.FromString(build_payload([("m", None, dt, v)]))
        assert metric_value(p.metrics[0], dt) == v
    m = pb.Payload.Metric()
    m.int_value = 0xFB  # an Int8 -5 kept at 8 bits by a C encoder
    assert metric_value(m, pb.Int8) == -5
    m.long_value = 2**32  # a UInt32 that does not fit
    with pytest.raises(ValueError, match="out of range"):
        metric_value(m, pb.UInt32)
    m = pb.Payload.Metric()
    set_metric_value(m, pb.Int32, 5)
    with pytest.raises(ValueError, match="expected long_value"):  # an Int64 never reads int_value
        metric_value(m, pb.Int64)


def test_passive_observer_is_the_default_and_never_asks_for_rebirth() -> None:
    cfg = build_source({"kind": "sparkplug"}).cfg
    assert cfg.host_id is None and cfg.rebirth is False
    with pytest.raises(ConfigError, match="passive observer never sends NCMD") as info:
        build_source({"kind": "sparkplug", "request_rebirth": True}, file="site.toml")
    assert info.value.file == "site.toml"
    host = {"kind": "sparkplug", "host_id": "fedline-a"}
    assert build_source(host).cfg.rebirth is False  # wildcards: off by default
    assert build_source({**host, "group_id": G}).cfg.rebirth is False  # still every node of the group
    assert build_source({**host, "group_id": G, "edge_node_id": N}).cfg.rebirth is True
    assert build_source({**host, "request_rebirth": True}).cfg.rebirth is True  # asked for explicitly
    for bad in ({"host_id": "a/b"}, {"group_id": "p+"}, {"edge_node_id": "#"}):
        with pytest.raises(ConfigError):
            build_source({"kind": "sparkplug", **bad})


def test_host_will_is_retained_qos1_with_a_new_timestamp_per_connection() -> None:
    source = build_source({"kind": "sparkplug", "host_id": "h1"})
    first = source._will()
    assert (first.topic, first.qos, first.retain) == ("spBv1.0/STATE/h1", 1, True)
    body = json.loads(first.payload)
    assert body == {"online": False, "timestamp": source._state_ts}
    assert (
        source._state_payload(True, source._state_ts)
        == json.dumps({"online": True, "timestamp": body["timestamp"]}).encode()
    )
    assert "spBv1.0/STATE/h1" in source.filters()


def test_full_broker_settings_in_both_mqtt_source_tables(tmp_path) -> None:
    site = tmp_path / "site.toml"
    for kind, extra in (("sparkplug", {}), ("mqtt_json", {"topics": ["t/#"]})):
        src = build_source(
            {
                "kind": kind,
                "url": "mqtts://broker.plant:8883",
                "protocol": "3.1.1",
                "username": "u",
                "password_file": "secrets/u.password",
                "ca_file": "pki/ca.crt",
                "cert_file": "pki/c.crt",
                "key_file": "pki/c.key",
                "keepalive_s": 15,
                **extra,
            },
            file=site,
        )
        s = src._settings()
        assert (s.tls, s.port, s.protocol, s.keepalive_s) == (True, 8883, "3.1.1", 15)
        assert s.password_file == str(tmp_path / "secrets/u.password")  # relative to the site file
        assert (s.ca_file, s.cert_file, s.key_file) == tuple(
            str(tmp_path / p) for p in ("pki/ca.crt", "pki/c.crt", "pki/c.key")
        )
        assert s.clean_start is True and s.session_expiry_s == 0  # never a persistent session
        for bad, key in (
            ({"url": "http://x"}, "url"),
            ({"ca_file": "ca.crt"}, "ca_file"),
            ({"protocol": "4"}, "protocol"),
            ({"clean_start": False}, "clean_start"),
            ({"url": "mqtts://x", "cert_file": "c.crt"}, "key_file"),
        ):
            with pytest.raises(ConfigError) as info:
                build_source({"kind": kind, **extra, **bad}, file=site, where="sources[0]")
            assert info.value.key == f"sources[0].{key}" and info.value.file == str(site), info.value


async def _edge(url: str, ident: str):
    u = urlparse(url)
    return aiomqtt.Client(u.hostname, u.port, identifier=ident)


def node_birth(seq: int, bdseq: int = 0) -> bytes:
    return build_payload(
        [
            ("bdSeq", None, pb.Int64, bdseq),
            ("Node Control/Rebirth", None, pb.Boolean, False),
            ("Temperature", 1, pb.Double, 21.5),
            ("Count", 2, pb.Int32, -5),
        ],
        seq=seq,
        timestamp_ms=1_700_000_000_000,
    )


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


async def test_host_application_state_rebirth_bdseq_and_own_reconnect(broker) -> None:
    """Over a real Mosquitto, the reader reaching it through a TCP proxy that can cut it off."""
    proxy = await TcpProxy(broker.port).start()
    host = "fedline-test"
    source = build_source(
        {
            "kind": "sparkplug",
            "name": "sp",
            "url": proxy.url,
            "group_id": G,
            "edge_node_id": N,
            "host_id": host,
            "rebirth_min_interval_s": 0.0,
            "reconnect_initial_s": 0.05,
            "reconnect_max_s": 0.3,
            "keepalive_s": 5,
        }
    )
    agen = source.__aiter__()
    nxt = asyncio.create_task(agen.__anext__())
    states: list[dict] = []
    try:
        async with await _edge(broker.url, "edge-node") as edge, await _edge(broker.url, "state-watcher") as watcher:
            await watcher.subscribe(f"spBv1.0/STATE/{host}", qos=1)
            await edge.subscribe(f"spBv1.0/{G}/NCMD/{N}", qos=0)

            async def collect() -> None:
                async for m in watcher.messages:
                    states.append({**json.loads(m.payload), "retain": m.retain, "qos": m.qos})

            watching = asyncio.create_task(collect())
            await asyncio.wait_for(source.ready.wait(), bound(10))

            async def until(pred, what: str) -> None:
                # 30 s: after a cut, the reader notices only by its keepalive (5 s, up to 1.5x) before it reconnects
                for _ in range(600):
                    if pred():
                        return
                    await asyncio.sleep(0.05)
                raise AssertionError(f"timed out waiting for {what}: {states}")

            await until(lambda: states, "the STATE birth")
            birth = states[0]
            assert birth["online"] is True and birth["qos"] == 1 and isinstance(birth["timestamp"], int)

            async def pub(mtype: str, payload: bytes) -> None:
                await edge.publish(f"spBv1.0/{G}/{mtype}/{N}", payload, qos=0)

            await pub("NBIRTH", node_birth(0, bdseq=7))
            assert (await asyncio.wait_for(nxt, bound(10))).values == {"Temperature": 21.5, "Count": -5}
            # a late NDEATH of the previous session (bdSeq 6) must not kill the reborn node
            await pub("NDEATH", build_payload([("bdSeq", None, pb.Int64, 6)]))
            await pub("NDATA", by_alias(1, [(1, 22.0)], TYPES))
            s = await asyncio.wait_for(agen.__anext__(), 5)
            assert s.good and s.values == {"Temperature": 22.0} and source.stats.extra["stale_ndeath"] == 1
            # seq 2 and 3 lost: a gap, and (one group, one node, a host) a rebirth request
            await pub("NDATA", by_alias(4, [(2, 9)], TYPES))
            assert (await asyncio.wait_for(agen.__anext__(), 5)).values == {"Count": 9}
            cmd = await asyncio.wait_for(anext(aiter(edge.messages)), 5)
            assert [(m.name, m.boolean_value) for m in pb.Payload.FromString(cmd.payload).metrics] == [
                ("Node Control/Rebirth", True)
            ]
            assert source.stats.gaps == 1 and source.stats.skipped == 2

            # the reader's own connection drops: the broker sends its will (offline, the birth's timestamp)
            proxy.cut()
            await until(lambda: any(not s["online"] for s in states), "the will")
            will = next(s for s in states if not s["online"])
            assert will["timestamp"] == birth["timestamp"] and will["qos"] == 1
            proxy.restore()
            await until(lambda: states[-1]["online"] and states[-1]["timestamp"] > birth["timestamp"], "a new birth")
            # it forgot the aliases and asked for a rebirth
            cmd = await asyncio.wait_for(anext(aiter(edge.messages)), bound(10))
            assert pb.Payload.FromString(cmd.payload).metrics[0].name == "Node Control/Rebirth"
            await pub("NDATA", by_alias(5, [(1, 23.0)], TYPES))
            lost = await asyncio.wait_for(agen.__anext__(), 5)
            while "reconnected" in (lost.error or ""):
                lost = await asyncio.wait_for(agen.__anext__(), 5)
            assert not lost.good and "NBIRTH was not seen" in (lost.error or "")
            await pub("NBIRTH", node_birth(0, bdseq=8))
            assert (await asyncio.wait_for(agen.__anext__(), 5)).values["Temperature"] == 21.5
            await pub("NDEATH", build_payload([("bdSeq", None, pb.Int64, 8)]))
            dead = await asyncio.wait_for(agen.__anext__(), 5)
            assert not dead.good and "NDEATH" in (dead.error or "")
            assert source.stats.reconnects == 1 and source.stats.extra["state_births"] >= 2

            # closing on purpose: an offline STATE first (the broker drops the will on DISCONNECT)
            n = len(states)
            await agen.aclose()
            await until(lambda: len(states) > n and not states[-1]["online"], "the STATE death")
            watching.cancel()
        async with await _edge(broker.url, "late-edge") as late:  # the retained STATE says offline
            await late.subscribe(f"spBv1.0/STATE/{host}", qos=1)
            retained = await asyncio.wait_for(anext(aiter(late.messages)), 5)
            assert retained.retain and json.loads(retained.payload)["online"] is False
    finally:
        await agen.aclose()
        await proxy.stop()


async def test_passive_observer_publishes_nothing(broker) -> None:
    source = build_source({"kind": "sparkplug", "url": broker.url, "group_id": G})
    agen = source.__aiter__()
    first = asyncio.create_task(agen.__anext__())
    await asyncio.wait_for(source.ready.wait(), bound(10))
    try:
        async with await _edge(broker.url, "edge-late") as edge, await _edge(broker.url, "spy") as spy:
            await spy.subscribe("#", qos=1)
            await edge.publish(f"spBv1.0/{G}/NDATA/{N}", by_alias(40, [(1, 1.0)], TYPES))  # DATA before BIRTH
            s = await asyncio.wait_for(first, 5)
            assert not s.good and "NBIRTH was not seen" in (s.error or "")
            seen = [str(m.topic) async for m in _drain(spy, 1.0)]
            assert seen == [f"spBv1.0/{G}/NDATA/{N}"]  # no NCMD, no STATE: only the node's own message
            assert "rebirth_requests" not in source.stats.extra
    finally:
        await agen.aclose()


async def _drain(client, seconds: float):
    try:
        async with asyncio.timeout(seconds):
            async for m in client.messages:
                yield m
    except TimeoutError:
        return
