"""Two edge agents and the real aggregator over a real Mosquitto: the wire contracts agree."""

from __future__ import annotations

import asyncio
import dataclasses

from nacl.public import SealedBox

from aggregator.config import load_config
from aggregator.reassembly import SenderChunks
from aggregator.service import Aggregator
from broker_bridge import binhead, envelope
from edge import rounds
from edge.agent import EdgeAgent
from edge.config import load_edge_config
from fedline.testing.patience import bound
from tests.conftest import eventually
from tests.edge.helpers import Federation, write_aggregator, write_csv, write_site

SITES = ["site-a", "site-c"]


async def test_two_sites_and_the_real_aggregator(mosquitto, tmp_path, monkeypatch) -> None:
    fed = Federation.create(tmp_path, SITES)
    sealed: list[bytes] = []  # every update the sites seal, as sent

    def spy(*args, **kwargs) -> bytes:
        sealed.append(envelope.seal_update(*args, **kwargs))
        return sealed[-1]

    monkeypatch.setattr(rounds, "seal_update", spy)
    receipts: list[bool] = []  # per receipt the aggregator seals: binary and compact (FLR version 3)?
    seal_receipt = envelope.seal_receipt

    def receipt_spy(doc, keys, box_pub, binary=False, compact=False) -> bytes:
        receipts.append(binary and compact)
        return seal_receipt(doc, keys, box_pub, binary, compact)

    monkeypatch.setattr(envelope, "seal_receipt", receipt_spy)
    agg_toml = tmp_path / "aggregator.toml"
    write_aggregator(fed, mosquitto, agg_toml)
    aggregator = Aggregator(load_config(agg_toml))
    arrived: list[bytes] = []  # the first bytes of every message on an update topic, as the aggregator took it
    add = SenderChunks.add
    monkeypatch.setattr(SenderChunks, "add", lambda self, *a: (arrived.append(a[2][:4]), add(self, *a))[1])
    statuses: list[bytes] = []  # every status the aggregator takes, as it came over the broker
    on_status = aggregator._on_status
    monkeypatch.setattr(
        aggregator, "_on_status", lambda site, payload: (statuses.append(payload), on_status(site, payload))
    )
    agg_task = asyncio.create_task(aggregator.run())
    await asyncio.wait_for(aggregator.started.wait(), bound(30))

    agents, tasks, stop = [], [], asyncio.Event()
    for i, site in enumerate(SITES):
        csv = write_csv(tmp_path / f"{site}.csv", 200, seed=i)
        path = write_site(fed, site, csv, mosquitto.url, mosquitto.paths[f"password:{site}"])
        agent = EdgeAgent(load_edge_config(path))
        agents.append(agent)
        tasks.append(asyncio.create_task(agent.run(stop)))
    try:
        # each site adopts the aggregator's version 0, trains, and its update is applied
        await eventually(lambda: all(a.base.manifest for a in agents) and all(a.sources_done for a in agents), 30)
        for a in agents:
            assert await a.train_once() is not None
        await eventually(lambda: all(a.outbox.depth()[0] == 0 for a in agents), 30)
        assert all(e.state == "applied" for a in agents for e in a.outbox.ledger())
        # the new global versions reach the sites, and their next round rebases on them
        await eventually(lambda: all(a.base.version >= 2 for a in agents), 30)
        for a in agents:
            assert await a.train_once() is not None
        await eventually(lambda: all(a.outbox.depth()[0] == 0 for a in agents), 30)
        for a in agents:
            second = a.outbox.ledger()[1]
            assert second.state == "applied" and second.base_version >= 1
        # the aggregator's manifest says it reads FLT2 and FLU2, so every update named its tensor table by id
        # and carried a binary header, and was applied: no JSON left in it (broker_bridge.layouts, .binhead)
        assert all(a.base.manifest["reads"] == list(envelope.READS) for a in agents)
        assert envelope.READS == ("FLT2", "FLU2", "FLH1", "FLS2", "FLC0")
        assert len(sealed) == 4
        for blob in sealed:
            inner = SealedBox(fed.aggregator.box_key).decrypt(blob[4:])
            assert inner[:4] == b"FLS2"  # the signature block without the verify key: the aggregator reads FLS2
            plain = inner[5 + inner[4] + 64 :]  # after the signature block
            assert plain[:4] == b"FLU\x02"
            head_len = int.from_bytes(plain[4:6], "little")  # the binary header, then the tensors
            assert plain[6 + head_len : 6 + head_len + 4] == b"FLT2"
        # both sites' statuses say they read FLT2, so the later versions' weights name their table by id too
        assert all(a.base.weights_blob[:4] == b"FLT2" for a in agents)
        # ... and the manifests name the spec by its hash (FLM2): each site checked it against its own spec
        assert all(a.base.manifest["spec_hash"] == envelope.spec_hash(a.spec.to_dict()) for a in agents)
        assert all("spec" not in a.base.manifest for a in agents)
        # ... in a binary body (FLM version 3): every site's status says it reads FLM3, and each verified it
        assert all(a.base.manifest_blob[:4] == b"FLM\x03" for a in agents)
        # each update went whole, without the chunk header (the aggregator reads FLC0), and was applied
        assert len(arrived) == 4 and set(arrived) == {b"FLE\x01"}
        # and compact binary receipts (FLR3): every receipt was, and the sites settled their outboxes on them
        assert len(receipts) >= 4 and all(receipts)
        # statuses: JSON until a site holds a manifest saying the aggregator reads FLH1, binary after; the
        # aggregator read both (the catch-up and the formats each site reads come from them)
        assert statuses[0][:1] == b"{" and statuses[-1][:4] == b"FLH1"
        last = binhead.read_status(statuses[-1])
        assert (
            last is not None and last["state"] == "online" and last["reads"] == ["FLT2", "FLR2", "FLM2", "FLM3", "FLR3"]
        )
        assert all(aggregator._reads[a.site] == {"FLT2", "FLR2", "FLM2", "FLM3", "FLR3"} for a in agents)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        aggregator.stop()
        await asyncio.wait_for(agg_task, bound(60))  # a model export may be under way
        for a in agents:
            a.close()


async def test_on_new_model_rounds_follow_the_federation(mosquitto, tmp_path) -> None:
    """training.on_new_model: the first round starts once the CSV backlog is in, and each adopted version
    starts the next at once (no timer: every_s is an hour, no new rows)."""
    fed = Federation.create(tmp_path, ["site-a"])
    agg_toml = tmp_path / "aggregator.toml"
    write_aggregator(fed, mosquitto, agg_toml)
    aggregator = Aggregator(load_config(agg_toml))
    agg_task = asyncio.create_task(aggregator.run())
    await asyncio.wait_for(aggregator.started.wait(), bound(30))
    csv = write_csv(tmp_path / "site-a.csv", 200, seed=0)
    path = write_site(
        fed,
        "site-a",
        csv,
        mosquitto.url,
        mosquitto.paths["password:site-a"],
        training={"on_new_model": True, "every_s": 3600.0, "every_rows": 10**9},
    )
    agent = EdgeAgent(load_edge_config(path))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await eventually(lambda: len([e for e in agent.outbox.ledger() if e.state == "applied"]) >= 3, 60)
        ledger = agent.outbox.ledger()
        # every later round started from the version the previous update produced
        assert [e.base_version for e in ledger[:3]] == [0, 1, 2]
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        aggregator.stop()
        await asyncio.wait_for(agg_task, bound(60))  # a model export may be under way
        agent.close()


async def test_old_and_new_formats_mix_a_new_aggregator_with_an_older_site(mosquitto, tmp_path, monkeypatch) -> None:
    """A plant upgrades its edges one by one: site-c plays an older agent (its status says nothing of the
    formats it reads). Both sites' updates are applied; the models stay FLT1 with the whole spec (site-c could
    not read FLT2 or a spec hash) and site-c's receipts stay JSON while site-a's are binary. Then an older
    aggregator (its manifest names no formats) gets FLT1 updates with JSON headers from the newer site."""
    fed = Federation.create(tmp_path, SITES)
    agg_toml = tmp_path / "aggregator.toml"
    write_aggregator(fed, mosquitto, agg_toml)
    aggregator = Aggregator(load_config(agg_toml))
    agg_task = asyncio.create_task(aggregator.run())
    await asyncio.wait_for(aggregator.started.wait(), bound(30))
    receipts: list[tuple[str, bool]] = []
    seal_receipt = envelope.seal_receipt

    def receipt_spy(doc, keys, box_pub, binary=False, compact=False) -> bytes:
        receipts.append((doc["site"], binary))
        return seal_receipt(doc, keys, box_pub, binary, compact)

    monkeypatch.setattr(envelope, "seal_receipt", receipt_spy)
    sealed: list[tuple[str, bytes]] = []
    formats: list[tuple[bool, ...]] = []  # the (FLT2, FLU2, FLS2) flags each seal was given, from its round's base

    def spy(header, *args, **kwargs) -> bytes:
        formats.append(tuple(args[3:6]))
        sealed.append((header.site, envelope.seal_update(header, *args, **kwargs)))
        return sealed[-1][1]

    monkeypatch.setattr(rounds, "seal_update", spy)
    agents, tasks, stop = [], [], asyncio.Event()
    for i, site in enumerate(SITES):
        csv = write_csv(tmp_path / f"{site}.csv", 200, seed=i)
        agent = EdgeAgent(
            load_edge_config(write_site(fed, site, csv, mosquitto.url, mosquitto.paths[f"password:{site}"]))
        )
        if site == "site-c":  # an older agent: no "reads" in its status
            monkeypatch.setattr(agent.status_publisher, "status", _without_reads(agent.status_publisher.status))
        agents.append(agent)
        tasks.append(asyncio.create_task(agent.run(stop)))
    try:
        await eventually(lambda: all(a.base.manifest for a in agents) and all(a.sources_done for a in agents), 30)
        for _ in range(2):
            for a in agents:
                assert await a.train_once() is not None
            await eventually(lambda: all(a.outbox.depth()[0] == 0 for a in agents), 30)
        await eventually(lambda: all(a.base.version >= 2 for a in agents), 30)
        assert all(e.state == "applied" for a in agents for e in a.outbox.ledger())
        assert all(a.base.weights_blob[:4] == b"FLT1" and "spec" in a.base.manifest for a in agents)
        assert all(a.base.manifest_blob[:4] == b"FLM\x01" for a in agents)  # JSON manifests: site-c reads no FLM3
        assert {s for s, binary in receipts if binary} == {"site-a"}
        assert {s for s, binary in receipts if not binary} == {"site-c"}
        # both sites send the compact update: the aggregator's manifest says it reads it
        assert {s for s, blob in sealed} == set(SITES)
        for _site, blob in sealed:
            plain = _plain(fed, blob)
            assert plain[:4] == b"FLU\x02"
        # an older aggregator: its manifest names no formats, so the newer site sends FLT1 and a JSON header
        a = agents[0]
        for _attempt in range(3):
            a.state.base = dataclasses.replace(a.state.base, manifest={**a.state.base.manifest, "reads": []})
            sealed.clear()
            formats.clear()
            assert await a.train_once() is not None
            # a version made from the last updates can arrive and be adopted between the line above and the
            # round's start (seen once in CI): then the round's base reads everything, and the try is repeated
            if formats[-1] == (False, False, False):
                break
        assert formats[-1] == (False, False, False), formats
        plain = _plain(fed, sealed[-1][1])
        assert plain[:4] == b"FLU\x01" and b'"dtype"' in plain and b"FLT1" in plain
        assert SealedBox(fed.aggregator.box_key).decrypt(sealed[-1][1][4:])[:4] == b"FLS1"  # with its verify key
        await eventually(lambda: a.outbox.depth()[0] == 0, 30)
        assert a.outbox.ledger()[-1].state in ("applied", "buffered")
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        aggregator.stop()
        await asyncio.wait_for(agg_task, bound(60))
        for a in agents:
            a.close()


def _without_reads(status):
    """A status method that leaves ``reads`` out, as an agent older than the formats does."""
    return lambda state="online": {k: v for k, v in status(state).items() if k != "reads"}


def _plain(fed: Federation, blob: bytes) -> bytes:
    """An update's plaintext, after the signature block (opened with the aggregator's key)."""
    inner = SealedBox(fed.aggregator.box_key).decrypt(blob[4:])
    return inner[5 + inner[4] + (96 if inner[:4] == b"FLS1" else 64) :]  # FLS2: no verify key
