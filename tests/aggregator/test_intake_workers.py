"""Intake workers and the reducer (issue 20 part 1): the partition, the forward format, the ACL, and kill -9.

The unit tests check the partition and the forward's crypto on bytes; the broker tests run a real
Mosquitto with the generated ACL; the ledger test runs two real `fedline aggregator --worker` processes and
the reducer, kills one worker with SIGKILL mid-stream and checks that every update was decided exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aggregator import partition
from aggregator.config import load_config
from aggregator.forward import open_forward, seal_forward
from aggregator.opener import Opened, open_update
from aggregator.reducer import Forwards
from broker_bridge import envelope
from broker_bridge.errors import PublishRefused, WireError
from broker_bridge.keys import KeyPair
from broker_bridge.mosquitto import MosquittoProcess, intake_users
from broker_bridge.topics import Topics
from tests.aggregator.helpers import make_federation, random_delta
from tests.conftest import eventually, settings_for

ROOT = Path(__file__).resolve().parents[2]
SITES = [f"site-{c}" for c in "abcdef"]
REFERENCE = {"body.0.weight": (8, 4), "body.0.bias": (8,)}


# --------------------------------------------------------------------------- partition
def test_rendezvous_score_is_blake2b_of_worker_and_site() -> None:
    # worked out independently: BLAKE2b-64 of "intake-0\0site-a", big-endian
    expected = int.from_bytes(hashlib.blake2b(b"intake-0\x00site-a", digest_size=8).digest(), "big")
    assert partition.score("intake-0", "site-a") == expected
    scores = {w: partition.score(w, "site-a") for w in ("intake-0", "intake-1", "intake-2")}
    assert partition.owner("site-a", scores) == max(scores, key=lambda w: scores[w])
    assert partition.owner("site-a", []) is None


def test_partition_covers_every_site_once_and_a_death_moves_only_the_dead_workers_sites() -> None:
    sites = [f"s{i:04d}" for i in range(1000)]
    workers = intake_users(3)
    shares = {w: partition.share(sites, workers, w) for w in workers}
    assert sorted(s for share in shares.values() for s in share) == sorted(sites)  # each site exactly once
    assert all(250 < len(s) < 420 for s in shares.values()), {w: len(s) for w, s in shares.items()}
    survivors = ["intake-0", "intake-2"]
    after = {w: partition.share(sites, survivors, w) for w in survivors}
    for w in survivors:
        assert shares[w] <= after[w]  # nobody else's site moved
    assert after["intake-0"] | after["intake-2"] == set(sites)
    # a worker that sees only itself live (its peers' liveness not read yet) takes every site
    assert partition.share(sites, [], "intake-1") == set(sites)


# --------------------------------------------------------------------------- the forward
def _opened(tmp_path: Path, *, bad: bool = False, fed=None):
    fed = fed or make_federation(tmp_path / "fed", ["site-a"])
    cfg = fed.config()
    rng = np.random.default_rng(0)
    delta = {k: rng.standard_normal(s).astype(np.float32) * 0.01 for k, s in REFERENCE.items()}
    if bad:
        delta["body.0.bias"][0] = np.nan
    blob, header = fed.seal("site-a", delta, 0)
    op = open_update(
        blob,
        cfg=cfg,
        keys=fed.agg,
        enrollment=fed.enrollment,
        reference=REFERENCE,
        max_norm=100.0,
        topic_site="site-a",
        msg_id="m1",
    )
    return fed, op, header, delta


def test_forward_round_trip_carries_the_workers_result(tmp_path: Path) -> None:
    fed, op, header, delta = _opened(tmp_path)
    worker = KeyPair.generate("worker", "intake-0")
    wire = seal_forward(op, worker, fed.agg.public().box_pub)
    back = open_forward(wire, fed.agg, {"intake-0": worker.public()}, from_worker="intake-0")
    assert back.reason is None and back.header == header and back.topic_site == "site-a" and back.msg_id == "m1"
    assert back.tensors is not None and all(np.array_equal(back.tensors[k], delta[k]) for k in delta)
    # aligned for their dtype whatever the JSON lengths before them (NumPy's flag: what its fast paths need,
    # aggregator.aligned); not 64-byte boundaries: a forward's plaintext lands wherever the allocator put it
    # (with fedline.heap's settings, test_heap.py in the same process, not on a page's fixed offset)
    assert all(back.tensors[k].flags.aligned for k in delta)
    expected_norm = float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values())))
    assert back.norm == pytest.approx(expected_norm, rel=1e-6) and back.sealed == wire
    # a refusal travels too, without the delta: the reducer records its verdict and answers the site
    _, refused, _, _ = _opened(tmp_path, bad=True, fed=fed)
    assert refused.reason == "nonfinite"
    back = open_forward(seal_forward(refused, worker, fed.agg.public().box_pub), fed.agg, {"intake-0": worker.public()})
    assert back.reason == "nonfinite" and back.tensors is None and back.header is not None


def test_forged_and_tampered_forwards_are_refused_by_name(tmp_path: Path) -> None:
    fed, op, _, _ = _opened(tmp_path)
    w0, w1 = KeyPair.generate("worker", "intake-0"), KeyPair.generate("worker", "intake-1")
    workers = {"intake-0": w0.public(), "intake-1": w1.public()}
    box = fed.agg.public().box_pub

    def reason(wire: bytes, topic_worker: str = "intake-0") -> str:
        with pytest.raises(WireError) as exc:
            open_forward(wire, fed.agg, workers, from_worker=topic_worker)
        return exc.value.reason

    # a site (or anyone) with a key of its own calling itself intake-0: it does not authenticate as the worker
    assert reason(seal_forward(op, KeyPair.generate("worker", "intake-0"), box)) == "signature"
    assert reason(seal_forward(op, KeyPair.generate("worker", "intake-7"), box)) == "unenrolled"
    assert reason(seal_forward(op, w1, box), "intake-0") == "schema"  # intake-1's forward on intake-0's topic
    good = seal_forward(op, w0, box)
    for at in (-5, 34, 16):  # the tag, the ciphertext, the salt (authenticated data)
        wire = bytearray(good)
        wire[at] ^= 1
        assert reason(bytes(wire)) == "signature"
    other = KeyPair.generate("aggregator", "aggregator")  # meant for another aggregator
    assert reason(seal_forward(op, w0, other.public().box_pub)) == "signature"
    assert reason(b"FLE\x01" + bytes(60)) == "framing"
    assert reason(b"FLW\x09" + bytes(60)) == "version"
    # two forwards of the same update never share a key or a ciphertext (a fresh salt each)
    assert seal_forward(op, w0, box)[13:29] != good[13:29] and seal_forward(op, w0, box)[40:] != good[40:]


def test_a_format_1_forward_buffered_before_an_upgrade_still_opens(tmp_path: Path) -> None:
    """Format 1 (SealedBox to the reducer, Ed25519 by the worker over SHA-256), built here by hand."""
    from nacl.public import SealedBox

    fed, _op, header, delta = _opened(tmp_path)
    w0 = KeyPair.generate("worker", "intake-0")
    doc = {
        "worker": "intake-0",
        "topic_site": "site-a",
        "msg_id": "m1",
        "header": header.to_dict(),
        "norm": 1.0,
        "reason": None,
        "detail": None,
    }
    head = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    plain = b"FLF\x01" + len(head).to_bytes(4, "little") + head + envelope.encode_tensors(delta)
    digest = hashlib.sha256(b"fedline-forward-v1\x00" + b"intake-0" + b"\x00" + plain).digest()
    inner = bytes([8]) + b"intake-0" + w0.signing_key.sign(digest).signature + plain
    wire = b"FLW\x01" + SealedBox(fed.agg.box_key.public_key).encrypt(inner)
    back = open_forward(wire, fed.agg, {"intake-0": w0.public()}, from_worker="intake-0")
    assert back.header == header and back.norm == 1.0
    assert back.tensors is not None and all(np.array_equal(back.tensors[k], delta[k]) for k in delta)


def test_reducer_answers_a_forged_forward_without_a_site(tmp_path: Path) -> None:
    fed, op, _, _ = _opened(tmp_path)
    cfg = _worker_files(fed, 2, fed.config(extra='[intake]\nworkers = 2\nkeys_dir = "."\n'))
    forwards = Forwards(cfg)
    good = seal_forward(op, KeyPair.load(fed.root / "intake-1.key"), fed.agg.public().box_pub)
    assert forwards.open(good, "intake-1").reason is None
    forged = forwards.open(
        seal_forward(op, KeyPair.generate("worker", "intake-1"), fed.agg.public().box_pub), "intake-1"
    )
    assert isinstance(forged, Opened) and forged.reason == "forward_signature" and forged.header is None
    header, tensors = forwards.reopen(good)  # a buffered forward read back after a restart
    assert header == op.header and set(tensors) == set(REFERENCE)


def test_a_worker_opens_updates_with_an_opening_key_that_cannot_sign(tmp_path: Path, capsys) -> None:
    """``fedline keys opening-key``: the aggregator's X25519 secret alone, 0600, a file kind of its own. It
    opens a site's sealed update exactly as the key pair does, and is refused where a signing key is needed."""
    import stat

    from broker_bridge.errors import KeyFileError
    from broker_bridge.keys import OpeningKey
    from fedline.cli import main

    fed, op, _, _ = _opened(tmp_path)
    out = tmp_path / "aggregator.opening.key"
    assert main(["keys", "opening-key", "--key", str(fed.root / "aggregator.key"), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["fedline"] == "opening-key" and "sign_seed" not in doc and stat.S_IMODE(out.stat().st_mode) == 0o600
    with pytest.raises(KeyFileError, match="expected a fedline private-key file, got 'opening-key'"):
        KeyPair.load(out)
    key = OpeningKey.load(out)
    assert key.public() == fed.agg.public()  # the enrollment's aggregator entry, signing half included
    again = open_update(
        op.sealed, cfg=fed.config(), keys=key, enrollment=fed.enrollment, reference=REFERENCE, max_norm=1e4
    )
    assert again.reason is None and again.header == op.header
    assert main(["keys", "show", str(out)]) == 0 and "signs nothing" in capsys.readouterr().out
    site_key = fed.root / "site-a.key"
    assert main(["keys", "opening-key", "--key", str(site_key), "--out", str(tmp_path / "x.key")]) == 1
    assert "only an aggregator" in capsys.readouterr().err


def test_a_worker_refuses_an_opening_key_of_another_aggregator(tmp_path: Path) -> None:
    from aggregator.intake_worker import IntakeWorker
    from broker_bridge.errors import FedlineError
    from fedline.config import ConfigError

    fed = make_federation(tmp_path / "fed", ["site-a"])
    other = make_federation(tmp_path / "other", ["site-a"])
    other.agg.opening_key().save(fed.root / "foreign.opening.key")
    _worker_files(fed, 2)
    extra = '[intake]\nworkers = 2\nkeys_dir = "."\nopening_key_file = "foreign.opening.key"\n'
    with pytest.raises(FedlineError, match="is not the key of the aggregator enrolled"):
        IntakeWorker(load_config(fed.write_config(extra=extra)), 0)
    with pytest.raises(ConfigError):
        load_config(fed.write_config(extra="[intake]\nworkers = 2\nopening_key_file = 3\n"))


def _worker_files(fed, n: int, cfg=None):
    for w in intake_users(n):
        kp = KeyPair.generate("worker", w)
        kp.save(fed.root / f"{w}.key")
        kp.public().save(fed.root / f"{w}.pub.json")
    return cfg


# --------------------------------------------------------------------------- the broker's fence
@pytest.fixture
def broker2(tmp_path: Path):
    b = MosquittoProcess(tmp_path / "broker", federation="test", sites=SITES, intake_workers=2).start()
    yield b
    b.stop()


@pytest.mark.broker
async def test_acl_only_workers_write_forwards_and_only_the_aggregator_reads_them(broker2) -> None:
    from broker_bridge.client import MqttClient

    topics = Topics("test")
    got: dict[str, list[str]] = {}

    async def reader(user: str) -> MqttClient:
        c = MqttClient(settings_for(broker2, user))
        await c.__aenter__()
        await c.subscribe(topics.forwards_filter() if user == "aggregator" else "fedline/test/#")
        await c.wait_connected(10)
        got[user] = []

        async def collect() -> None:
            async for m in c.messages():
                got[user].append(m.topic)

        asyncio.get_running_loop().create_task(collect())
        return c

    agg, obs = await reader("aggregator"), await reader("observer")
    w0 = MqttClient(settings_for(broker2, "intake-0"))
    site = MqttClient(settings_for(broker2, "site-a"))
    async with w0, site:
        await w0.wait_connected(10)
        await site.wait_connected(10)
        await w0.publish(topics.forward_chunk("intake-0", "m1", 0), b"x", qos=1)
        with pytest.raises(PublishRefused):  # another worker's forward topic
            await w0.publish(topics.forward_chunk("intake-1", "m2", 0), b"x", qos=1)
        with pytest.raises(PublishRefused):  # a site posing as a worker
            await site.publish(topics.forward_chunk("intake-0", "m3", 0), b"x", qos=1)
        await eventually(lambda: topics.forward_chunk("intake-0", "m1", 0) in got["aggregator"], 10)
        await asyncio.sleep(0.3)
    assert got["aggregator"] == [topics.forward_chunk("intake-0", "m1", 0)]
    assert not [t for t in got["observer"] if "/intake/" in t]  # the observer reads the federation, not intake
    await agg.__aexit__(None, None, None)
    await obs.__aexit__(None, None, None)


# --------------------------------------------------------------------------- kill -9 of a worker
def _start_worker(conf: Path, index: int, broker: MosquittoProcess, log: Path) -> subprocess.Popen:
    pw = broker.workdir / "credentials" / f"intake-{index}.password"
    cmd = [sys.executable, "-m", "fedline.cli", "aggregator", "--config", str(conf), "--worker", str(index)]
    return subprocess.Popen(
        [*cmd, "--password-file", str(pw)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.mark.broker
async def test_two_workers_and_a_reducer_stay_ledger_exact_when_a_worker_is_killed(broker2, tmp_path: Path) -> None:
    from aggregator.service import Aggregator
    from tests.aggregator.test_service_broker import Site, broker_table

    fed = make_federation(tmp_path / "fed", SITES)
    _worker_files(fed, 2)
    strategy = 'kind = "fedbuff"\nbuffer_size = 3\nbuffer_timeout_s = 0.5\nmax_staleness = 50'
    extra = '[intake]\nworkers = 2\nkeys_dir = "."\nopening_key_file = "aggregator.opening.key"\n'
    fed.agg.opening_key().save(fed.root / "aggregator.opening.key")
    conf = fed.write_config(strategy=strategy, extra=extra, broker=broker_table(broker2))
    # the workers' file names no readable key pair: they open with the opening key and can sign nothing
    conf.write_text(conf.read_text().replace('key_file = "aggregator.key"', 'key_file = "no-such.key"'))
    assert 'key_file = "no-such.key"' in conf.read_text()
    agg = Aggregator(fed.config(strategy=strategy, extra=extra, broker=broker_table(broker2)))
    counts: dict[str, int] = {}
    assert agg.forwards is not None
    opener = agg.forwards.open

    def counting_open(blob: bytes, worker: str) -> Opened:  # which worker forwarded what (the reducer's view)
        counts[worker] = counts.get(worker, 0) + 1
        return opener(blob, worker)

    agg.forwards.open = counting_open  # type: ignore[method-assign]
    reducer = asyncio.create_task(agg.run())
    logs = [tmp_path / f"intake-{i}.log" for i in range(2)]
    workers = [_start_worker(conf, i, broker2, logs[i]) for i in range(2)]
    per_site, resend_s = 4, 1.5
    sends: list[str] = []  # one entry per send of an update (first sends and resends)
    rng = np.random.default_rng(3)
    try:
        await asyncio.wait_for(agg.started.wait(), 60)
        reference = {k: v for k, v in agg.core.model.items()}
        async with contextlib.AsyncExitStack() as stack:
            parties = [await stack.enter_async_context(Site(fed, broker2, s)) for s in SITES]

            async def run_site(p) -> None:
                for _ in range(per_site):
                    blob, h = fed.seal(p.site, random_delta(reference, rng), 0)
                    n = 0
                    while p.receipt(h.counter) is None:  # the outbox: resend until a receipt comes
                        await p.send(blob, f"{h.msg_id}r{n}")
                        n += 1
                        sends.append(p.site)
                        with_receipt = lambda: p.receipt(h.counter) is not None
                        try:
                            await eventually(with_receipt, resend_s)
                        except AssertionError:
                            continue

            # both workers up and sharing the sites: each has forwarded at least one update
            await eventually(lambda: all((tmp_path / f"intake-{i}.log").exists() for i in range(2)), 30)
            sending = [asyncio.create_task(run_site(p)) for p in parties]
            await eventually(lambda: counts.get("intake-0", 0) >= 2 and counts.get("intake-1", 0) >= 2, 90)
            workers[1].send_signal(signal.SIGKILL)
            workers[1].wait()
            killed_at = dict(counts)
            await asyncio.wait_for(asyncio.gather(*sending), 60)
            # every update of every site is decided: wait for the last buffer's timeout flush
            await eventually(lambda: not agg.core.buffer, 20)
            assert counts["intake-0"] > killed_at["intake-0"]  # the survivor took the dead worker's sites
            receipts = {p.site: p.receipts for p in parties}
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        agg.stop()
        await asyncio.wait_for(reducer, 30)
        for w in workers:
            w.wait(20)
    # the ledger: one verdict per (site, counter) in the store, each applied in exactly one version or refused
    from aggregator.store import Store

    store = Store(Path(fed.root / "state" / "aggregator.sqlite"))
    try:
        final = {(v.site, v.counter): v.verdict for v in store.verdicts()}
        applied: list[tuple[str, int]] = []
        for version in range(1, agg.core.version + 1):
            lineage = store.checkpoint(version, blobs=False).lineage
            applied += [(u["site"], u["counter"]) for u in lineage["updates"]]
    finally:
        store.close()
    expected = {(s, c) for s in SITES for c in range(1, per_site + 1)}
    assert set(final) == expected, sorted(set(final) ^ expected)
    assert len(applied) == len(set(applied)), "an update was applied twice"
    tally = {v: list(final.values()).count(v) for v in set(final.values())}
    print(f"\nledger: {len(expected)} updates, {len(sends)} sends, forwards {killed_at} at the kill, {counts} in all;")
    print(f"final verdicts {tally}, {agg.core.version} versions, {len(applied)} applied once each")
    assert set(applied) == {k for k, v in final.items() if v == "applied"}
    assert {v for v in final.values()} <= {"applied", "stale"}  # stale: superseded in its buffer, never lost
    for s, rs in receipts.items():  # every site holds a signed receipt for every counter it sent
        assert {r["counter"] for r in rs} == set(range(1, per_site + 1)), (s, rs)


def test_config_refuses_intake_workers_with_secure_aggregation(tmp_path: Path) -> None:
    from fedline.config import ConfigError

    fed = make_federation(tmp_path / "fed", SITES)
    assert fed.config(extra="[intake]\nworkers = 2\n").intake.workers == 2
    with pytest.raises(ConfigError, match=r"intake\.workers.*secure aggregation"):
        fed.config(
            strategy="min_sites = 3\nbuffer_size = 3\nsecure_aggregation = true", extra="[intake]\nworkers = 2\n"
        )
    with pytest.raises(ConfigError, match="workers must be between 0 and 64"):
        fed.config(extra="[intake]\nworkers = 65\n")
