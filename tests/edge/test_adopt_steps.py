"""The edge agent's subscriptions while it follows the model by int8 steps (``edge.adopt``), in-process.

A real agent (its stores on disk, its follower, its line export) fed the messages the real release builder
makes; the MQTT client is a recorder of subscribe / unsubscribe calls. After its first version made from a
step the agent stops taking every version's full weights; a version whose parent it does not hold is fetched
by subscribing to that one version's weights, dropped again once it is adopted.
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


async def test_following_by_steps_drops_the_weights_and_fetches_one_version_it_cannot_make(tmp_path) -> None:
    fed = Federation.create(tmp_path, ["site-a"])
    agent = EdgeAgent(load_edge_config(write_site(fed, "site-a", write_csv(tmp_path / "a.csv", 60), "mqtt://x", None)))
    try:
        client = Recorder()
        agent.state.client = client  # type: ignore[assignment]
        key, topics, ad = new_content_key(), agent.topics, agent.adopter

        async def no_export() -> None:  # the line's ONNX is not this test's subject (edge.line_export has its own)
            return None

        ad._export = no_export
        await ad.on_grant(seal_grant(FEDERATION, fed.sites["site-a"].public(), 1, key, fed.aggregator))
        rng = np.random.default_rng(3)
        models = [{k: np.array(v) for k, v in agent.base.shared.items()}]  # version 0, as the aggregator seeds it
        releases = []
        for v in range(1, 4):
            target = {k: x + rng.standard_normal(x.shape).astype(np.float32) * 0.05 for k, x in models[-1].items()}
            block, made = quantised.model_step(models[-1], target)
            models.append(made)
            releases.append(
                build_release(
                    v,
                    made,
                    agent.spec,
                    FEDERATION,
                    fed.aggregator,
                    topics,
                    lambda _t: 4096,
                    None,
                    epoch=1,
                    content_key=key,
                    step=(v - 1, block),
                )
            )

        async def deliver(release, kinds: tuple[str, ...]) -> None:
            for topic, payload in release.chunks:
                info = topics.parse(topic)
                if info.kind in kinds:
                    await ad.on_chunk(topic, info.version, info.index, payload, info.kind == "delta")
            await ad.on_manifest(release.manifest_blob)

        await deliver(releases[0], ("delta",))  # version 1 from its step
        assert agent.base.version == 1 and all(np.array_equal(agent.base.shared[k], models[1][k]) for k in models[1])
        assert client.calls == [("unsubscribe", topics.weights_filter())] and not ad.weights_subscribed
        client.calls.clear()
        await ad.on_manifest(releases[2].manifest_blob)  # version 3, made from 2, which this site missed
        assert client.calls == [("subscribe", topics.weights_of(3))] and agent.base.version == 1
        await deliver(releases[2], ("weights",))
        assert agent.base.version == 3 and all(np.array_equal(agent.base.shared[k], models[3][k]) for k in models[3])
        assert client.calls == [("subscribe", topics.weights_of(3)), ("unsubscribe", topics.weights_of(3))]
    finally:
        agent.close()


async def test_a_step_whose_chunks_never_arrive_falls_back_to_that_versions_weights(tmp_path) -> None:
    """Regression: a version announced by its step waited for the step's chunks until the next manifest."""
    fed = Federation.create(tmp_path, ["site-a"])
    agent = EdgeAgent(load_edge_config(write_site(fed, "site-a", write_csv(tmp_path / "a.csv", 60), "mqtt://x", None)))
    try:
        client = Recorder()
        agent.state.client = client  # type: ignore[assignment]
        key, topics, ad = new_content_key(), agent.topics, agent.adopter
        ad.STEP_WAIT_S = 0.05

        async def no_export() -> None:
            return None

        ad._export = no_export
        await ad.on_grant(seal_grant(FEDERATION, fed.sites["site-a"].public(), 1, key, fed.aggregator))
        rng = np.random.default_rng(5)
        models = [{k: np.array(v) for k, v in agent.base.shared.items()}]
        releases = []
        for v in (1, 2):
            target = {k: x + rng.standard_normal(x.shape).astype(np.float32) * 0.05 for k, x in models[-1].items()}
            block, made = quantised.model_step(models[-1], target)
            models.append(made)
            releases.append(
                build_release(
                    v, made, agent.spec, FEDERATION, fed.aggregator, topics, lambda _t: 4096, None,
                    epoch=1, content_key=key, step=(v - 1, block),
                )
            )  # fmt: skip
        for topic, payload in releases[0].chunks:  # version 1 by its step: the weights are unsubscribed
            info = topics.parse(topic)
            if info.kind == "delta":
                await ad.on_chunk(topic, info.version, info.index, payload, True)
        await ad.on_manifest(releases[0].manifest_blob)
        assert agent.base.version == 1 and not ad.weights_subscribed
        client.calls.clear()

        await ad.on_manifest(releases[1].manifest_blob)  # version 2 by its step, whose chunks never come
        assert client.calls == [] and ad.follower.by_step
        await eventually(lambda: client.calls, timeout=5)
        assert client.calls == [("subscribe", topics.weights_of(2))] and agent.base.version == 1
        assert ad.follower.step_failures == 1
        for topic, payload in releases[1].chunks:
            info = topics.parse(topic)
            if info.kind == "weights":
                await ad.on_chunk(topic, info.version, info.index, payload)
        assert agent.base.version == 2 and all(np.array_equal(agent.base.shared[k], models[2][k]) for k in models[2])
        assert client.calls[-1] == ("unsubscribe", topics.weights_of(2))
    finally:
        agent.close()
