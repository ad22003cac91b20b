"""The edge agent's subscriptions while it follows the model by int8 steps (``edge.adopt``), in-process.

A real agent (its stores on disk, its follower, its line export) fed the messages the real release builder
makes; the MQTT client is a recorder of subscribe / unsubscribe calls. Following by full weights the agent
subscribes to the next version's weights only; after its first version made from a step it stops taking full
weights; a version whose parent it does not hold is fetched by subscribing to that one version's weights,
dropped again once it is adopted.
"""

from __future__ import annotations

import asyncio

import numpy as np

from aggregator.publish import build_release
from broker_bridge import quantised
from broker_bridge.federation_key import new_content_key, seal_grant
from edge.agent import EdgeAgent
from edge.config import load_edge_config
from tests.conftest import eventually
from tests.edge.helpers import FEDERATION, Federation, write_csv, write_site


class Recorder:
    """What the adopter asks of the MQTT client."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.connected = asyncio.Event()  # offline: what the agent's gauges read

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        self.calls.append(("subscribe", topic))

    async def unsubscribe(self, topic: str) -> None:
        self.calls.append(("unsubscribe", topic))


async def stepping_agent(tmp_path, versions: int, seed: int):
    """A granted agent with a recording client, and ``versions`` releases each made by an int8 step from the last.

    Returns (agent, client, releases, models); models[v] is version v's weights as the aggregator makes them.
    """
    fed = Federation.create(tmp_path, ["site-a"])
    agent = EdgeAgent(load_edge_config(write_site(fed, "site-a", write_csv(tmp_path / "a.csv", 60), "mqtt://x", None)))
    client = Recorder()
    agent.state.client = client  # type: ignore[assignment]
    key, ad = new_content_key(), agent.adopter

    async def no_export() -> None:  # the line's ONNX is not this test's subject (edge.line_export has its own)
        return None

    ad._export = no_export
    await ad.on_grant(seal_grant(FEDERATION, fed.sites["site-a"].public(), 1, key, fed.aggregator))
    await ad.watch_next()  # what the agent subscribes on connecting: the next version's weights
    assert client.calls == [("subscribe", agent.topics.weights_of(1))]
    client.calls.clear()
    rng = np.random.default_rng(seed)
    models = [{k: np.array(v) for k, v in agent.base.shared.items()}]  # version 0, as the aggregator seeds it
    releases = []
    for v in range(1, versions + 1):
        target = {k: x + rng.standard_normal(x.shape).astype(np.float32) * 0.05 for k, x in models[-1].items()}
        block, made = quantised.model_step(models[-1], target)
        models.append(made)
        releases.append(
            build_release(
                v, made, agent.spec, FEDERATION, fed.aggregator, agent.topics, lambda _t: 4096, None,
                epoch=1, content_key=key, step=(v - 1, block),
            )
        )  # fmt: skip
    return agent, client, releases, models


async def deliver(agent: EdgeAgent, release, kinds: tuple[str, ...], manifest: bool = True) -> None:
    """Hand the adopter a release's chunks of ``kinds`` (``"delta"``, ``"weights"``), then its manifest."""
    topics, ad = agent.topics, agent.adopter
    for topic, payload in release.chunks:
        info = topics.parse(topic)
        if info.kind in kinds:
            await ad.on_chunk(topic, info.version, info.index, payload, info.kind == "delta")
    if manifest:
        await ad.on_manifest(release.manifest_blob)


async def test_following_by_steps_drops_the_weights_and_fetches_one_version_it_cannot_make(tmp_path) -> None:
    agent, client, releases, models = await stepping_agent(tmp_path, 3, seed=3)
    try:
        topics, ad = agent.topics, agent.adopter
        await deliver(agent, releases[0], ("delta",))  # version 1 from its step
        assert agent.base.version == 1 and all(np.array_equal(agent.base.shared[k], models[1][k]) for k in models[1])
        assert client.calls == [("subscribe", topics.deltas_filter()), ("unsubscribe", topics.weights_of(1))]
        assert not ad.weights_subscribed and ad.steps_subscribed
        client.calls.clear()
        await ad.on_manifest(releases[2].manifest_blob)  # version 3, made from 2, which this site missed
        assert client.calls == [("subscribe", topics.weights_of(3))] and agent.base.version == 1
        await deliver(agent, releases[2], ("weights",))
        assert agent.base.version == 3 and all(np.array_equal(agent.base.shared[k], models[3][k]) for k in models[3])
        assert client.calls == [("subscribe", topics.weights_of(3)), ("unsubscribe", topics.weights_of(3))]
    finally:
        agent.close()


async def test_a_step_whose_chunks_never_arrive_falls_back_to_that_versions_weights(tmp_path) -> None:
    """Regression: a version announced by its step waited for the step's chunks until the next manifest."""
    agent, client, releases, models = await stepping_agent(tmp_path, 2, seed=5)
    try:
        topics, ad = agent.topics, agent.adopter
        ad.STEP_WAIT_S = 0.05
        await deliver(agent, releases[0], ("delta",))  # version 1 by its step: the weights are unsubscribed
        assert agent.base.version == 1 and not ad.weights_subscribed
        client.calls.clear()

        await ad.on_manifest(releases[1].manifest_blob)  # version 2 by its step, whose chunks never come
        assert client.calls == [] and ad.follower.by_step
        await eventually(lambda: client.calls, timeout=5)
        assert client.calls == [("subscribe", topics.weights_of(2))] and agent.base.version == 1
        assert ad.follower.step_failures == 1
        await deliver(agent, releases[1], ("weights",), manifest=False)
        assert agent.base.version == 2 and all(np.array_equal(agent.base.shared[k], models[2][k]) for k in models[2])
        assert client.calls[-1] == ("unsubscribe", topics.weights_of(2))
    finally:
        agent.close()
