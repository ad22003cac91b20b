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
from broker_bridge import envelope
from broker_bridge.client import MqttClient
from broker_bridge.errors import PublishRefused
from broker_bridge.keys import KeyPair
from broker_bridge.topics import Topics
from fedline.testing.patience import bound
from tests.conftest import eventually, settings_for
from tests.hostile.rig import FEDERATION, copy, forge, like, make_fed, same
from tests.parties import Party

CHUNK = 4096


def broker_toml(broker, user: str = "aggregator") -> str:
    return (
        f'[broker]\nurl = "{broker.url}"\nusername = "{user}"\npassword = "{broker.password(user)}"\n'
        f'client_id = "agg-hostile"\nbackoff_min_s = 0.05\nbackoff_max_s = 0.5\nmax_chunk = {CHUNK}\n'
    )


def party(broker, user: str, agg_sign_pub: bytes, keys: KeyPair | None = None) -> Party:
    """A login on the broker; with the site's ``keys`` it reads its (sealed) receipts."""
    return Party(broker, user, agg_sign_pub, FEDERATION, CHUNK, keys=keys)


async def test_hostile_sites_over_the_broker(mosquitto, tmp_path: Path) -> None:
    fed = make_fed(tmp_path / "fed", ["site-a", "site-b"])
    cfg = fed.config('kind = "fedasync"\nalpha = 0.5\nmax_staleness = 50', "max_norm = 100.0", broker_toml(mosquitto))
    agg = Aggregator(cfg)
    task = asyncio.create_task(agg.run())
    sign_pub = fed.agg.public().sign_pub
    try:
        await asyncio.wait_for(agg.started.wait(), bound(30))
        async with (
            party(mosquitto, "site-a", sign_pub, fed.sites["site-a"]) as a,
            party(mosquitto, "site-b", sign_pub, fed.sites["site-b"]) as b,
            party(mosquitto, "site-c", sign_pub) as c,
        ):
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
            for n, blob in enumerate(
                [
                    fed.seal("site-a", like(core.model, 0.3), 0, signer=fed.outsiders["site-c"])[0],
                    forge(fed.header("site-c", 0), like(core.model, 0.3), fed.outsiders["site-c"], fed.agg),
                ]
            ):
                await c.send(blob, f"c-{n}")
                await eventually(
                    lambda n=n: (
                        agg.metrics.value("fedline_aggregator_rejections_total", {"reason": "unenrolled"}) == 2 + n
                    ),
                    20,
                )

            # 4. a model-sized update of NaN from an enrolled site
            nan, nh = fed.seal("site-b", like(core.model, np.nan), 0)
            await b.send(nan, nh.msg_id)
            assert await b.verdict(2) == ("rejected", "nonfinite", nh.counter)

            # 5. random bytes as chunks and as a complete "update": counted, dropped, nothing breaks
            await c.client.publish(c.topics.update_chunk("site-c", "junk", 0), b"\x00" * 64)
            await c.send(b"FLE\x01" + bytes(200), "junk-2")
            await eventually(
                lambda: agg.metrics.value("fedline_aggregator_rejections_total", {"reason": "decrypt"}) == 1, 20
            )
            assert c.sealed_receipts == 0  # an outsider gets no receipt: there is no key to seal it to

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
        assert m.value("fedline_aggregator_chunk_errors_total") >= 1  # the junk chunk, counted and dropped
    finally:
        agg.stop()
        await asyncio.wait_for(task, bound(30))


# --------------------------------------------------------------------------- forged global model
class Rows:
    """A steady stream of 3-feature rows for the line (what RowBuilder would make)."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    async def __aiter__(self):
        from firmware_adapters.rows import Row

        lo, hi = np.array([295.0, 0.0, 1100.0]), np.array([305.0, 80.0, 2900.0])
        while not self.stopped:
            for _ in range(5):
                yield Row(x=self.rng.uniform(lo, hi).astype(np.float32), y=None, ts=time.time())
            await asyncio.sleep(0.005)


def line_service(tmp_path: Path, mosquitto, enrollment: Path, name: str):
    from dataclasses import asdict

    from edge.inference.config import parse_infer_config
    from edge.inference.service import InferenceService

    settings = settings_for(mosquitto, "site-a", client_id=f"site-a-{name}")
    doc = {
        "line": {
            "site": "site-a",
            "federation": FEDERATION,
            "state_dir": f"state-{name}",
            "poll_s": 0.05,
            "model_source": "manifest",
            "enrollment": str(enrollment),
            "site_key": str(enrollment.parent / "site-a.key"),
            "canary": {"enabled": False},
        },
        "rows": {
            "features": [
                {"tag": "temp", "range": [295.0, 305.0]},
                {"tag": "torque", "range": [0.0, 80.0]},
                {"tag": "speed", "range": [1100.0, 2900.0]},
            ]
        },
        "output": {"file": f"{name}.jsonl"},
        "broker": {k: v for k, v in asdict(settings).items() if v is not None},
    }
    rows = Rows()
    return InferenceService(parse_infer_config(doc, tmp_path / f"{name}.toml"), rows=rows), rows


async def test_forged_global_model_reaches_no_edge_and_no_line(mosquitto, tmp_path: Path) -> None:
    from aggregator import publish
    from edge.agent import EdgeAgent
    from edge.config import load_edge_config
    from models import build_model, export_onnx, load_shared_state
    from tests.edge.helpers import Federation, write_csv, write_site

    fed = Federation.create(tmp_path, ["site-a", "site-b"])
    fed.aggregator.save(tmp_path / "keys" / "aggregator.key")
    (tmp_path / "aggregator.toml").write_text(
        f'[aggregator]\nfederation = "{FEDERATION}"\nkey_file = "keys/aggregator.key"\n'
        f'enrollment_file = "keys/enrollment.json"\nstate_dir = "agg-state"\nseed = 0\n\n'
        '[model]\nkind = "mlp"\nn_features = 3\nhidden = [8]\npersonal = ["head."]\n\n'
        '[strategy]\nkind = "fedasync"\nalpha = 0.5\nmin_sites = 1\n\n' + broker_toml(mosquitto)
    )
    cfg = load_config(tmp_path / "aggregator.toml")
    agg = Aggregator(cfg)
    agg_task = asyncio.create_task(agg.run())
    site_path = write_site(
        fed, "site-a", write_csv(tmp_path / "rows.csv", 120), mosquitto.url, mosquitto.paths["password:site-a"]
    )
    agent = EdgeAgent(load_edge_config(site_path))
    stop_agent = asyncio.Event()
    agent_task: asyncio.Task | None = None
    line, rows = line_service(tmp_path, mosquitto, fed.enrollment_path, "line")
    line_task: asyncio.Task | None = None
    late_line, late_rows = line_service(tmp_path, mosquitto, fed.enrollment_path, "late-line")
    late_task: asyncio.Task | None = None
    try:
        await asyncio.wait_for(agg.started.wait(), bound(30))
        await eventually(lambda: agg.published_version == 0, 60)
        agent_task = asyncio.create_task(agent.run(stop_agent))
        line_task = asyncio.create_task(line.run())
        await eventually(lambda: agent.client is not None and agent.client.connected.is_set(), 20)
        await eventually(lambda: line.current is not None and line.current.version == 0, 30)
        real_v0 = copy(agent.base.shared)

        # The forgery: the real model's shapes with the attacker's values, a matching ONNX, a manifest
        # whose sizes and hashes are all consistent, version 50, signed with a key that is not the aggregator's.
        attacker = KeyPair.generate("aggregator", "aggregator")
        evil = {k: np.full(v.shape, 7.0, np.float32) for k, v in agg.core.model.items()}

        def evil_onnx(shared):
            model = build_model(cfg.model, seed=0)
            load_shared_state(model, cfg.model, shared)
            return export_onnx(model, cfg.model)

        topics = Topics(FEDERATION)
        # the attacker is even a member (it holds the federation content key): only the signature stops it
        epoch = agg.granter.epoch
        forged = publish.build_release(
            50,
            evil,
            cfg.model,
            FEDERATION,
            attacker,
            topics,
            lambda t: CHUNK,
            evil_onnx,
            epoch=epoch.number,
            content_key=epoch.key,
        )

        # (a) with a site's broker login the broker refuses every model topic (generated ACL)
        async with MqttClient(settings_for(mosquitto, "site-b", max_chunk=CHUNK)) as site_b:
            await site_b.wait_connected(10)
            with pytest.raises(PublishRefused):
                await site_b.publish(topics.manifest(), forged.manifest_blob, retain=True)
            with pytest.raises(PublishRefused):
                await site_b.publish(*forged.chunks[0], retain=True)

        # (b) the aggregator's broker password leaked (not its signing key): the forgery is on the broker,
        # retained, in place of the real manifest
        refused_edge = agent.metrics.models_refused._value.get()
        async with MqttClient(settings_for(mosquitto, "aggregator", client_id="thief", max_chunk=CHUNK)) as thief:
            await thief.wait_connected(10)
            await publish.publish_release(thief, topics, forged)
        await eventually(lambda: agent.metrics.models_refused._value.get() > refused_edge, 20)
        await eventually(lambda: line.stats.refused["signature"] >= 1, 20)
        n = line.stats.predictions
        await eventually(lambda: line.stats.predictions > n + 50, 20)  # still scoring, with the real model
        assert agent.base.version == 0 and same(agent.base.shared, real_v0)
        assert line.current.version == 0 and line.current_version() == 0
        assert "signature" in (agent.last_error or "")
        # a line that starts now finds only the forged manifest retained: it refuses it and loads nothing
        late_task = asyncio.create_task(late_line.run())
        await eventually(lambda: late_line.stats.refused["signature"] >= 1, 20)
        assert late_line.current is None

        # the real aggregator's next version is taken by everyone, the forgery never
        async with party(mosquitto, "site-b", fed.aggregator.public().sign_pub, fed.sites["site-b"]) as b:
            from broker_bridge.envelope import UpdateHeader

            h = UpdateHeader(
                site="site-b", counter=1, msg_id="b-1", base_version=0, n_samples=20, privacy={"epsilon": 1.0}
            )
            delta = {k: np.full(v.shape, 0.01, np.float32) for k, v in agg.core.model.items()}
            await b.send(envelope.seal_update(h, delta, fed.sites["site-b"], fed.aggregator.public().box_pub), "b-1")
            assert (await b.verdict(0))[:2] == ("applied", None)
        await eventually(lambda: agg.published_version == 1, 60)
        await eventually(lambda: agent.base.version == 1, 30)
        await eventually(
            lambda: line.current.version == 1 and late_line.current is not None and late_line.current.version == 1, 30
        )
        for k, v in agent.base.shared.items():
            np.testing.assert_allclose(v, real_v0[k] + 0.5 * 0.01, rtol=1e-5, atol=1e-6)
            assert not np.any(v == 7.0)
        scored = [json.loads(x) for x in (tmp_path / "line.jsonl").read_text().splitlines()]
        assert {p["version"] for p in scored} <= {0, 1}
    finally:
        rows.stop()
        late_rows.stop()
        stop_agent.set()
        for t in (line_task, late_task, agent_task):
            if t is not None:
                await asyncio.wait_for(t, bound(20))
        agent.close()
        agg.stop()
        await asyncio.wait_for(agg_task, bound(30))
