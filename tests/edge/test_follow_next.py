"""Following the model by full weights: a site subscribes to the next version's weights, not every version's.

Why: the weight chunks are retained, so the wildcard ``model/+/weights/#`` brought every retained version on each
(re)connect (version 0 too, which a starting site builds itself from the seed) and every clearing of an old
one. In-process with a recorder for the MQTT client, then over a real Mosquitto with the real aggregator.
"""

from __future__ import annotations

import asyncio

import numpy as np

from aggregator.config import load_config
from aggregator.publish import build_release
from aggregator.service import Aggregator
from broker_bridge.federation_key import new_content_key, seal_grant
from edge.agent import EdgeAgent
from edge.config import load_edge_config
from fedline.testing.patience import bound
from tests.conftest import eventually
from tests.edge.helpers import FEDERATION, Federation, write_aggregator, write_csv, write_site
from tests.edge.test_adopt_steps import Recorder, deliver


async def _agent(tmp_path, seed_of_release_0: int | None):
    """A granted agent with a recording client and releases 0-3 (version 0: the site's own seed model, or
    with ``seed_of_release_0`` other weights)."""
    fed = Federation.create(tmp_path, ["site-a"])
    agent = EdgeAgent(load_edge_config(write_site(fed, "site-a", write_csv(tmp_path / "a.csv", 60), "mqtt://x", None)))
    client = Recorder()
    agent.state.client = client  # type: ignore[assignment]
    key, ad = new_content_key(), agent.adopter

    async def no_export() -> None:
        return None

    ad._export = no_export
    await ad.on_grant(seal_grant(FEDERATION, fed.sites["site-a"].public(), 1, key, fed.aggregator))
    rng = np.random.default_rng(seed_of_release_0 or 0)
    models = [{k: np.array(v) for k, v in agent.base.shared.items()}]
    if seed_of_release_0 is not None:
        models[0] = {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in models[0].items()}
    for _ in range(3):
        models.append({k: v + rng.standard_normal(v.shape).astype(np.float32) * 0.05 for k, v in models[-1].items()})
    releases = [
        build_release(
            v, m, agent.spec, FEDERATION, fed.aggregator, agent.topics, lambda _t: 4096, None, epoch=1, content_key=key
        )
        for v, m in enumerate(models)
    ]
    return agent, client, releases, models


def _holds(agent: EdgeAgent, model: dict) -> bool:
    return all(np.array_equal(agent.base.shared[k], v) for k, v in model.items())


async def test_a_site_holding_version_0_takes_it_from_the_manifest_and_subscribes_one_version_ahead(tmp_path) -> None:
    agent, client, releases, models = await _agent(tmp_path, None)
    try:
        topics, ad = agent.topics, agent.adopter
        await ad.watch_next()
        assert client.calls == [("subscribe", topics.weights_of(1))]
        client.calls.clear()
        await ad.on_manifest(releases[0].manifest_blob)  # its own seed model: the signed hash matches
        assert agent.base.version == 0 and agent.base.manifest["version"] == 0 and _holds(agent, models[0])
        assert client.calls == []  # nothing fetched
        await deliver(agent, releases[1], ("weights",))  # chunks (subscribed ahead), then the manifest
        assert agent.base.version == 1 and _holds(agent, models[1])
        assert client.calls == [("unsubscribe", topics.weights_of(1)), ("subscribe", topics.weights_of(2))]
        client.calls.clear()
        await ad.on_manifest(releases[3].manifest_blob)  # version 2 missed: 3 is fetched on its own
        assert client.calls == [("subscribe", topics.weights_of(3))] and agent.base.version == 1
        await deliver(agent, releases[3], ("weights",), manifest=False)
        assert agent.base.version == 3 and _holds(agent, models[3])
        assert client.calls[1:] == [
            ("unsubscribe", topics.weights_of(3)),
            ("unsubscribe", topics.weights_of(2)),
            ("subscribe", topics.weights_of(4)),
        ]
    finally:
        agent.close()


async def test_a_version_0_that_is_not_the_sites_seed_model_is_fetched(tmp_path) -> None:
    agent, client, releases, models = await _agent(tmp_path, 7)
    try:
        topics, ad = agent.topics, agent.adopter
        await ad.watch_next()
        client.calls.clear()
        await ad.on_manifest(releases[0].manifest_blob)  # another seed: the hash differs, so its chunks are needed
        assert client.calls == [("subscribe", topics.weights_of(0))] and not agent.base.manifest
        await deliver(agent, releases[0], ("weights",), manifest=False)
        assert agent.base.version == 0 and agent.base.manifest and _holds(agent, models[0])
        assert client.calls[-1] == ("unsubscribe", topics.weights_of(0))  # the next version's stays subscribed
    finally:
        agent.close()


async def test_over_mosquitto_a_joiner_gets_only_the_current_versions_weights(mosquitto, tmp_path) -> None:
    """Real aggregator (FedBuff K = 1, two versions retained): site-a never downloads version 0 (it holds it),
    site-b joining at version 2 downloads version 2 only, not the retained version 1 beside it."""
    fed = Federation.create(tmp_path, ["site-a", "site-b"])
    agg_toml = tmp_path / "aggregator.toml"
    strategy = 'kind = "fedbuff"\nbuffer_size = 1\nmin_sites = 1\nmax_staleness = 10'
    write_aggregator(fed, mosquitto, agg_toml, strategy=strategy, extra="[validation]\nmax_norm = 1000.0")
    aggregator = Aggregator(load_config(agg_toml))
    agg_task = asyncio.create_task(aggregator.run())
    agents: list[tuple[EdgeAgent, asyncio.Event, asyncio.Task]] = []
    chunks: dict[str, list[tuple[str, int | None, bool]]] = {}

    def start(site: str) -> EdgeAgent:
        csv = write_csv(tmp_path / f"{site}.csv", 80, seed=len(agents))
        agent = EdgeAgent(
            load_edge_config(write_site(fed, site, csv, mosquitto.url, mosquitto.paths[f"password:{site}"]))
        )
        handle, seen = agent.handle_message, chunks.setdefault(site, [])

        async def recording(msg) -> None:  # every message on a model chunk topic, empty ones (clearings) too
            info = agent.topics.parse(msg.topic)
            if info.kind in ("weights", "delta"):
                seen.append((info.kind, info.version, len(msg.payload) > 0))
            await handle(msg)

        agent.handle_message = recording  # type: ignore[method-assign]
        stop = asyncio.Event()
        agents.append((agent, stop, asyncio.create_task(agent.run(stop))))
        return agent

    def same(agent: EdgeAgent) -> bool:
        core = aggregator.core
        assert core is not None
        return agent.base.version == core.version and all(
            np.array_equal(agent.base.shared[k], v) for k, v in core.model.items()
        )

    try:
        await asyncio.wait_for(aggregator.started.wait(), bound(30))
        a = start("site-a")
        await eventually(lambda: a.base.manifest and a.sources_done, 30)
        for v in (1, 2):
            assert await a.train_once() is not None
            await eventually(lambda v=v: aggregator.published_version == v and same(a), 30)
        b = start("site-b")
        await eventually(lambda: b.base.manifest and same(b), 30)
        # site-a: versions 1 and 2, not version 0 (from its own seed), no clearing of version 0 (published when
        # version 2 came), no int8 steps (none published, so not subscribed: not even their clearings)
        assert set(chunks["site-a"]) == {("weights", 1, True), ("weights", 2, True)}, chunks
        assert set(chunks["site-b"]) == {("weights", 2, True)}, chunks  # not version 1, retained beside it
        assert not a.adopter.steps_subscribed and not b.adopter.steps_subscribed
    finally:
        for _agent, stop, _task in agents:
            stop.set()
        await asyncio.gather(*(t for *_, t in agents), return_exceptions=True)
        aggregator.stop()
        await asyncio.wait_for(agg_task, bound(60))
        for agent, *_ in agents:
            agent.close()


async def test_on_connecting_a_site_that_holds_an_adopted_version_subscribes_to_the_next_ones_weights(tmp_path) -> None:
    """So that a catch-up's live republish reaches it on a cluster node that keeps no retained copies; a site
    with only its seed model subscribes to no weights until a manifest names a version (it may hold that one)."""
    agent, client, releases, _models = await _agent(tmp_path, None)
    try:
        topics = agent.topics
        await agent._subscribe(client)  # type: ignore[arg-type]
        assert not [c for c in client.calls if "/weights/" in c[1]], client.calls
        await agent.adopter.on_manifest(releases[0].manifest_blob)
        await deliver(agent, releases[1], ("weights",))
        assert agent.base.version == 1
        agent.adopter._next = None  # a restart: nothing subscribed yet
        client.calls.clear()
        await agent._subscribe(client)  # type: ignore[arg-type]
        assert [c for c in client.calls if "/weights/" in c[1]] == [("subscribe", topics.weights_of(2))]
    finally:
        agent.close()
