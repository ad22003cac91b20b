"""Hostile parties on a real Mosquitto (generated config and ACL) against the real services.

- sites that replay, forge another site's id, republish a captured update on
  their own topic, or send a model-sized NaN update, against the aggregator
  service: each gets a signed "rejected" receipt naming why (or its original
  verdict, for a duplicate), the model does not move, and the service goes on;
- a forged global model: a site's credentials cannot even publish on the model
  topics (the broker refuses), and with the aggregator's *broker* credentials
  leaked, a complete forged model (weights, ONNX, a manifest with consistent
  hashes, signed by another key) is loaded by neither the edge agent nor the
  line inference, which keep serving the real model and take the real next one.

The broker's conftest enrolls logins for site-a, site-b, site-c; the
federation's enrollment lists only site-a and site-b (site-c has a broker
login but no enrolled key: a revoked site, or a stolen password).
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import load_config
from aggregator.service import Aggregator
from broker_bridge import chunking, envelope
from broker_bridge.client import MqttClient
from broker_bridge.errors import PublishRefused
from broker_bridge.keys import KeyPair
from broker_bridge.topics import Topics
from tests.conftest import eventually, settings_for
from tests.hostile.rig import FEDERATION, copy, forge, like, make_fed, same

CHUNK = 4096


def broker_toml(broker, user: str = "aggregator") -> str:
    return (f'[broker]\nurl = "{broker.url}"\nusername = "{user}"\npassword = "{broker.password(user)}"\n'
            f'client_id = "agg-hostile"\nbackoff_min_s = 0.05\nbackoff_max_s = 0.5\nmax_chunk = {CHUNK}\n')


class Party:
    """Someone with a broker login: publishes chunked blobs, collects verified receipts for its login."""

    def __init__(self, broker, user: str, agg_sign_pub: bytes) -> None:
        self.user = user
        self.client = MqttClient(settings_for(broker, user, max_chunk=CHUNK))
        self.topics = Topics(FEDERATION)
        self.agg_sign_pub = agg_sign_pub
        self.receipts: list[dict] = []
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> "Party":
        await self.client.__aenter__()
        await self.client.subscribe(self.topics.receipts(self.user))
        await self.client.wait_connected(10)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await self.client.__aexit__(*exc)

    async def _read(self) -> None:
        async for m in self.client.messages():
            self.receipts.append(envelope.verify_receipt(m.payload, self.agg_sign_pub))

    async def send(self, blob: bytes, msg_id: str, as_site: str | None = None) -> None:
        site = as_site or self.user
        await self.client.publish_many([(self.topics.update_chunk(site, msg_id, i), c)
                                        for i, c in enumerate(chunking.split(blob, msg_id, CHUNK))])

    async def verdict(self, n_before: int) -> tuple[str, str | None, int]:
        await eventually(lambda: len(self.receipts) > n_before, 20)
        r = self.receipts[n_before]
        return r["verdict"], r["reason"], r["counter"]


async def test_hostile_sites_over_the_broker(mosquitto, tmp_path: Path) -> None:
    fed = make_fed(tmp_path / "fed", ["site-a", "site-b"])
    cfg = fed.config('kind = "fedasync"\nalpha = 0.5\nmax_staleness = 50', "max_norm = 100.0", broker_toml(mosquitto))
    agg = Aggregator(cfg)
    task = asyncio.create_task(agg.run())
    sign_pub = fed.agg.public().sign_pub
    try:
        await asyncio.wait_for(agg.started.wait(), 30)
        async with Party(mosquitto, "site-a", sign_pub) as a, Party(mosquitto, "site-b", sign_pub) as b, \
                Party(mosquitto, "site-c", sign_pub) as c:
            core = agg.core
            genuine, h = fed.seal("site-a", like(core.model, 0.01), 0)
            await a.send(genuine, h.msg_id)
            assert await a.verdict(0) == ("applied", None, h.counter)
            after, version = copy(core.model), core.version

            # 1. replay: the same ciphertext again under fresh chunk ids, and an old never-decided counter
            await a.send(genuine, "replay-1")
            assert await a.verdict(1) == ("applied", None, h.counter)  # its original verdict, applied once
            held_back, hb = fed.seal("site-a", like(core.model, 0.4), 0, counter=0)
            await a.send(held_back, hb.msg_id)
            assert await a.verdict(2) == ("rejected", "replay", 0)

            # 2. site-b captured site-a's ciphertext and publishes it on its own topic
            await b.send(genuine, "captured")
            assert (await b.verdict(0))[:2] == ("rejected", "schema")
            # ... or tries site-a's topic: the broker itself refuses (ACL, MQTT 5 reason code)
            with pytest.raises(PublishRefused):
                await b.send(genuine, "on-a-topic", as_site="site-a")

            # 3. forged ids: site-b signs as site-a; site-c (login, not enrolled) as site-a and as itself
            forged, fh = fed.seal("site-a", like(core.model, 0.3), 0, signer=fed.sites["site-b"])
            await b.send(forged, fh.msg_id)
            assert (await b.verdict(1))[:2] == ("rejected", "unenrolled")
            for n, blob in enumerate([fed.seal("site-a", like(core.model, 0.3), 0, signer=fed.outsiders["site-c"])[0],
                                      forge(fed.header("site-c", 0), like(core.model, 0.3), fed.outsiders["site-c"],
                                            fed.agg)]):
                await c.send(blob, f"c-{n}")
                assert (await c.verdict(n))[:2] == ("rejected", "unenrolled")

            # 4. a model-sized update of NaN from an enrolled site
            nan, nh = fed.seal("site-b", like(core.model, np.nan), 0)
            await b.send(nan, nh.msg_id)
            assert await b.verdict(2) == ("rejected", "nonfinite", nh.counter)

            # 5. random bytes as chunks and as a complete "update": counted, dropped, nothing breaks
            await c.client.publish(c.topics.update_chunk("site-c", "junk", 0), b"\x00" * 64)
            await c.send(b"FLE\x01" + bytes(200), "junk-2")
            assert (await c.verdict(2))[:2] == ("rejected", "decrypt")

            assert same(core.model, after) and core.version == version == 1
            # the service is still there: a genuine update from site-b is applied
            ok, oh = fed.seal("site-b", like(core.model, 0.01), 1)
            await b.send(ok, oh.msg_id)
            assert await b.verdict(3) == ("applied", None, oh.counter)
            assert core.version == 2
        m = agg.metrics
        assert m.value("fedline_aggregator_rejections_total", {"reason": "unenrolled"}) == 3
        assert m.value("fedline_aggregator_rejections_total", {"reason": "replay"}) == 1
        assert m.value("fedline_aggregator_rejections_total", {"reason": "nonfinite"}) == 1
        assert m.value("fedline_aggregator_duplicates_total") == 1
        assert agg.reassembler.stats.malformed >= 1
    finally:
        agg.stop()
        await asyncio.wait_for(task, 30)
