"""An adversarial capture of a whole (shortened) ``fedline demo``: what the wire gives away.

The demo runs against a broker of this test's own (``--broker``), an anonymous
Mosquitto whose operator subscribes to ``#`` and keeps every message. The
capture is then handed to three adversaries (issue 13):

1. **the broker operator**, with no keys: reads no weights, manifests, site
   names, sample counts, losses, accuracies or row counts, in any encoding.
   Statuses are JSON with the liveness/privacy fields only; every other
   payload's bytes past its clear framing have the entropy of random bytes.
2. **a competitor holding one site's keys**: reads the models (it is a member)
   but cannot open another site's update or receipt, and the manifests it
   opens name no site, no sample count, no lineage.
3. **a revoked site** (the demo's spare, revoked once version 1 exists):
   opens nothing the broker carried after the aggregator cleared its grant.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from nacl.exceptions import CryptoError
from nacl.public import SealedBox

from broker_bridge import binhead, chunking, envelope
from broker_bridge.client import BrokerSettings, MqttClient
from broker_bridge.errors import SecAggError, WireError
from broker_bridge.federation_key import Keyring, open_manifest, open_notice, sealed_manifest_header
from broker_bridge.keys import Enrollment, KeyPair
from broker_bridge.mosquitto import free_port, mosquitto_binary
from broker_bridge.secagg import messages as m
from broker_bridge.topics import Topics
from edge.status_doc import STATUS_FIELDS
from fedline.testing.patience import bound

ROOT = Path(__file__).resolve().parents[2]
#: words that name what must not be readable: field names of updates, statuses of old, lineage, manifests
WORDS = [
    b"n_samples",
    b"samples",
    b"loss",
    b"accuracy",
    b"rows",
    b"holdout",
    b"lineage",
    b"counter",
    b"weights",
    b"spec",
    b"hidden",
    b"federation",
    b"epsilon_spent",
    b"verdict",
    b"applied",
    b"staleness",
]


#: bytes of clear framing before the sealed part, by topic kind (the rest must look random)
CLEAR_FRAMING = {"manifest": 12, "secagg_cohort": 8, "secagg_survivors": 8}  # FLX|ver|epoch|version, FLN|ver|epoch


def needles(sites: list[str]) -> list[bytes]:
    """What to look for in ciphertext: words and quoted site names of at least 5 bytes.

    A shorter needle turns up in megabytes of random bytes by chance (a 3-byte ``"H"`` about once per
    16 MiB per position set), so short words are searched as JSON strings, and short site names are left
    to the entropy check and to ``"site``, which any JSON naming a site carries.
    """
    out = [w if len(w) >= 6 else b'"' + w + b'"' for w in WORDS] + [b'"site']
    return out + [q for s in sites if len(q := f'"{s}"'.encode()) >= 6]


def entropy(data: bytes) -> float:
    counts = Counter(data)
    return -sum(c / len(data) * math.log2(c / len(data)) for c in counts.values())


def operator_broker(tmp_path: Path):
    """A plain Mosquitto the operator runs: anonymous, no ACL, sees everything."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.fail("this test needs the mosquitto broker: apt-get install mosquitto")
    port = free_port()
    conf = tmp_path / "operator.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"max_queued_messages 100000\nlog_dest file {tmp_path / 'operator.log'}\n"
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, port


async def capture_demo(tmp_path: Path, port: int) -> tuple[list[tuple[str, bytes]], dict]:
    """Run the shortened demo against the operator's broker while recording ``#``."""
    settings = BrokerSettings(
        url=f"mqtt://127.0.0.1:{port}",
        client_id="operator-capture",
        clean_start=True,
        backoff_min_s=0.05,
        backoff_max_s=0.5,
    )
    captured: list[tuple[str, bytes]] = []
    async with MqttClient(settings) as client:
        await client.subscribe("#", qos=1)
        await client.wait_connected(10)

        async def record() -> None:
            async for m in client.messages():
                captured.append((m.topic, m.payload))

        task = asyncio.create_task(record())
        cmd = [
            sys.executable,
            "-m",
            "fedline.cli",
            "demo",
            "--no-progress",
            "--broker",
            f"mqtt://127.0.0.1:{port}",
            "--run-dir",
            str(tmp_path / "run"),
            "--report",
            str(tmp_path / "report"),
            "--max-rows-per-site",
            "300",
            "--versions",
            "3",
            "--cut-after-version",
            "1",
            "--cut-seconds",
            "3",
            "--round-seconds",
            "1.5",
            "--timeout",
            "100",
            "--splits",
            "0",
            "--revoke-spare-after-version",
            "1",
        ]
        proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await asyncio.wait_for(proc.communicate(), bound(400))
        await asyncio.sleep(1.0)
        task.cancel()
    report_path = tmp_path / "report" / "report.json"
    assert report_path.exists(), out.decode()[-3000:]
    return captured, json.loads(report_path.read_text())


def sealed_body(kind: str, payload: bytes) -> bytes:
    """The part of a payload past its clear framing (what must look random)."""
    if kind == "update" and envelope.is_sealed_update(payload):  # sent whole, without the chunk header (FLC0)
        return payload[4:]
    if kind in ("update", "weights", "onnx"):
        return chunking.parse_chunk(payload).payload
    return payload[CLEAR_FRAMING.get(kind, 4) :]  # else FLQ / FLG / FLY / FLP | ver


@pytest.mark.broker
def test_capture_of_a_demo_run_gives_the_three_adversaries_nothing(tmp_path: Path) -> None:
    broker, port = operator_broker(tmp_path)
    try:
        time.sleep(0.3)
        captured, report = asyncio.run(capture_demo(tmp_path, port))
    finally:
        broker.terminate()
        broker.wait(bound(10))
    keys_dir = tmp_path / "run" / "keys"
    enrollment = Enrollment.load(keys_dir / "enrollment.json")
    topics = Topics(enrollment.federation)
    agg_pub = enrollment.aggregator.sign_pub
    sites = [s["site"] for s in report["sites"]]
    assert len(sites) >= 3 and report["model_versions"] >= 2
    assert report["revocation"]["revoked_at_version"] is not None
    kinds = Counter()
    by_kind: dict[str, list[bytes]] = {}
    for topic, payload in captured:
        kind = topics.parse(topic).kind
        kinds[kind] += 1
        if payload:
            by_kind.setdefault(kind, []).append(payload)
    assert {"update", "receipts", "status", "fedkey", "manifest", "weights", "onnx"} <= set(kinds), kinds

    # 1. the broker operator, no keys -------------------------------------------------------------------
    for payload in by_kind["status"]:
        doc = binhead.read_status(payload)  # JSON or binary (FLH1): the same fields either way
        assert doc is not None, payload
        assert set(doc) <= set(STATUS_FIELDS) | {"reason"}, doc  # liveness, version, ε, outbox depth only
    # secure aggregation (on in the demo): cohort and survivor announcements sealed for members, requests to one
    assert {"secagg_cohort", "secagg_survivors", "secagg_request", "secagg_reply"} <= set(kinds), kinds
    for kind, payloads in by_kind.items():
        if kind == "status":
            continue
        for p in payloads:  # past the clear framing (chunk headers name the message id, the topic the rest)
            for word in needles([*sites, "spare"]):
                assert word not in sealed_body(kind, p), (kind, word)
        body = b"".join(sealed_body(kind, p) for p in payloads)
        if len(body) >= 4096:  # enough bytes for the estimate: random bytes give 8 - 255 / (2 n ln 2)
            assert entropy(body) > 7.9, (kind, len(body), entropy(body))
    for p in by_kind["manifest"]:
        epoch, version = sealed_manifest_header(p)  # all the operator reads of a model
        assert epoch >= 1 and version >= 0

    # 2. a competitor holding one site's keys -------------------------------------------------------------
    me = KeyPair.load(keys_dir / f"{sites[0]}.key")
    mine = Keyring()
    for topic, p in captured:
        if topic == topics.fedkey(me.ident) and p:
            mine.add_grant(p, me, agg_pub, topics.federation)
    opened = [open_manifest(p, mine, agg_pub)[0] for p in by_kind["manifest"]]
    assert opened  # a member reads the models ...
    for doc in opened:  # ... which name no site, no sample count, no lineage (``reads``: the aggregator's formats)
        fields = {"federation", "version", "epoch", "created_at", "spec", "spec_hash", "weights", "onnx", "metric"}
        assert set(doc) <= fields | {"reads"}
    others = [s for s in sites if s != me.ident]
    box = SealedBox(me.box_key)
    reassemblers = {s: chunking.Reassembler() for s in sites}
    updates_of_others = 0
    for topic, p in captured:
        info = topics.parse(topic)
        whole = info.kind == "update" and p and envelope.is_sealed_update(p)
        if info.kind == "update" and p and (done := (info.msg_id, p) if whole else reassemblers[info.site].add(p)):
            if info.site in others:
                updates_of_others += 1
                with pytest.raises(CryptoError):  # sealed to the aggregator alone
                    box.decrypt(done[1][4:])
        if info.kind == "receipts" and p and info.site in others:
            with pytest.raises(WireError) as exc:
                envelope.open_receipt(p, me, agg_pub)
            assert exc.value.reason == "decrypt"
    assert updates_of_others >= len(others)
    # ... and every version it reads is the masked sum of at least 3 sites: no one plant's delta to subtract
    survivors = [m.open_survivors(open_notice(p, mine, "survivors"), agg_pub)[0] for p in by_kind["secagg_survivors"]]
    assert survivors and all(len(s.survivors) >= 3 for s in survivors), [s.survivors for s in survivors]
    cohorts = [
        m.open_cohort(open_notice(p, mine, "cohort"), agg_pub, topics.federation)[0] for p in by_kind["secagg_cohort"]
    ]
    assert all(len(c.members) >= 3 for c in cohorts)
    versions = {doc["version"] for doc in opened if doc["version"] >= 1}
    assert len(versions) <= len({s.cohort for s in survivors}), (versions, len(survivors))
    for topic, p in captured:  # unmask requests (they name the survivors and acks) are for their member alone
        info = topics.parse(topic)
        if info.kind == "secagg_request" and p and info.site in others:
            with pytest.raises(SecAggError):
                m.UnmaskRequest.open(p, me)

    # 3. the revoked site -----------------------------------------------------------------------------------
    spare = KeyPair.load(keys_dir / "spare.key")
    held = Keyring()  # every key the spare was ever granted
    cleared_at = None
    for i, (topic, p) in enumerate(captured):
        if topic == topics.fedkey("spare"):
            if p:
                held.add_grant(p, spare, agg_pub, topics.federation)
            else:
                cleared_at = i
    assert held and cleared_at is not None, "the spare had a grant and the aggregator cleared it"
    after = captured[cleared_at + 1 :]
    manifests_after = [p for t, p in after if t == topics.manifest() and p]
    assert manifests_after, "a version was published after the revocation"
    for p in manifests_after:
        with pytest.raises(WireError) as exc:
            open_manifest(p, held, agg_pub)
        assert exc.value.reason == "epoch"
    model_chunks = chunking.Reassembler()
    blobs = [
        done[1]
        for t, p in after
        if p and topics.parse(t).kind in ("weights", "onnx") and (done := model_chunks.add(p)) is not None
    ]
    assert blobs
    for blob in blobs:
        for key in held.values():
            with pytest.raises(WireError):
                envelope.open_for_federation(blob, key)
    assert not any(t == topics.fedkey("spare") and p for t, p in after)  # no new grant for it
    notices_after = [p for t, p in after if p and topics.parse(t).kind in ("secagg_cohort", "secagg_survivors")]
    assert notices_after, "cohorts ran after the revocation"
    for p in notices_after:
        with pytest.raises(WireError) as exc:
            open_notice(p, held, "notice")
        assert exc.value.reason == "epoch"
