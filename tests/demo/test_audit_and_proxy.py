"""The traffic audit finds raw records in any form a leak would take, and none in sealed
updates; the TCP proxy counts bytes and cuts a client off, against a real Mosquitto."""

from __future__ import annotations

import asyncio
import json
import os
import struct

import numpy as np
import pytest

from broker_bridge.client import MqttClient
from broker_bridge.envelope import UpdateHeader, encode_tensors, seal_update
from broker_bridge.keys import KeyPair
from fedline.demo.audit import RawRecordDetector, Recorded, TrafficRecorder, audit
from fedline.demo.data import load_demo_data
from fedline.netproxy import TcpProxy
from tests.conftest import FEDERATION, eventually, settings_for


@pytest.fixture(scope="module")
def ai4i():
    d = load_demo_data(derived=False)  # the measured values: what the demo's audit searches for
    raw = np.concatenate([np.concatenate([s.x_train, s.x_test]) for s in d.sites])
    return d, raw, RawRecordDetector(raw, d.normalise(raw))


def test_finds_records_as_text_json_and_packed_floats(ai4i):
    d, raw, det = ai4i
    row = d.sites[0].train_rows[3]  # L's 4th training row = record 3
    csv_line = ",".join(row[f] for f in d.features).encode()
    assert 3 in det.find(b"garbage " + csv_line + b" more")
    as_json = json.dumps({f: float(row[f]) for f in d.features}).encode()
    assert 3 in det.find(as_json)
    norm = d.normalise(raw[10:11])[0]
    assert 10 in det.find(json.dumps(norm.tolist()).encode())  # normalised, as float32 text
    for fmt, values in (("<5f", raw[20]), (">5f", raw[21]), ("<5d", raw[22]), (">5d", norm.astype(float))):
        blob = os.urandom(7) + struct.pack(fmt, *values) + os.urandom(9)
        found = det.find(blob)
        assert found, fmt
    # values spread over one message count too (all five present), a lone value does not
    spread = b"; ".join(f"{f}={row[f]}".encode() for f in d.features)
    assert 3 in det.find(spread)
    assert not det.find(row[d.features[0]].encode())


def test_no_records_in_random_bytes_or_a_sealed_update(ai4i):
    d, raw, det = ai4i
    assert det.find(os.urandom(300_000)) == set()
    site, agg = KeyPair.generate("site", "L"), KeyPair.generate("aggregator", "agg")
    # the worst case: a "delta" that IS the raw records; sealed, nothing shows
    tensors = {"w": raw[:500].astype(np.float32), "n": d.normalise(raw[:500])}
    assert det.find(encode_tensors(tensors))  # the plaintext would leak ...
    blob = seal_update(
        UpdateHeader(site="L", counter=1, msg_id="u1", base_version=0, n_samples=500, privacy={}),
        tensors,
        site,
        agg.public().box_pub,
    )
    assert det.find(blob) == set()  # ... the sealed update does not


def test_audit_counts_distinct_records_and_names_offending_topics(ai4i):
    _d, raw, det = ai4i
    leak = struct.pack("<5f", *raw[5])
    msgs = [
        Recorded("fedline/x/model/manifest", b"{}", True, 0.0),
        Recorded("fedline/x/sites/L/status", leak, True, 0.0),
        Recorded("fedline/x/sites/L/status", leak, True, 0.0),
    ]
    r = audit(msgs, det, lambda t: t.split("/")[-1])
    assert r.raw_records == 1 and r.messages == 3
    assert r.messages_with_records == ["fedline/x/sites/L/status"] * 2
    assert r.by_kind == {"manifest": 1, "status": 2}


async def test_recorder_sees_everything_under_the_federation_as_observer(mosquitto):
    got = []
    rec = TrafficRecorder(
        settings_for(mosquitto, "observer", client_id="audit"), f"fedline/{FEDERATION}/#", on_message=got.append
    )
    await rec.start()
    try:
        async with MqttClient(settings_for(mosquitto, "site-a")) as site:
            await site.publish(f"fedline/{FEDERATION}/sites/site-a/status", b'{"state":"online"}', retain=True)
            await site.publish(f"fedline/{FEDERATION}/sites/site-a/update/u1/0", b"\x00" * 100)
        await eventually(lambda: len(rec.messages) >= 2)
    finally:
        await rec.stop()
    assert {m.topic.rsplit("/", 1)[-1] for m in rec.messages} == {"status", "0"}
    assert len(got) == len(rec.messages)


async def test_proxy_counts_bytes_and_cut_drops_and_refuses(mosquitto):
    proxy = await TcpProxy(mosquitto.port).start()
    try:
        s = settings_for(mosquitto, "site-a", client_id="via-proxy")
        from dataclasses import replace

        s = replace(s, url=proxy.url)
        async with MqttClient(s) as client:
            await client.wait_connected(10)
            await client.publish(f"fedline/{FEDERATION}/sites/site-a/update/u1/0", b"x" * 5000)
            assert proxy.stats.bytes_up > 5000 and proxy.stats.bytes_down > 0
            proxy.cut()
            await eventually(lambda: not client.connected.is_set(), timeout=10)
            await asyncio.sleep(0.5)
            assert not client.connected.is_set()
            assert proxy.stats.refused >= 1  # the client tried again and was turned away
            proxy.restore()
            await client.wait_connected(10)
            await client.publish(f"fedline/{FEDERATION}/sites/site-a/update/u2/0", b"y" * 10)
            assert proxy.stats.connections >= 2
    finally:
        await proxy.stop()
