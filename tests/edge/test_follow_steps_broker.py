"""Over a real Mosquitto: edges follow the global model by its int8 steps, bit for bit, and a joiner catches up.

The real aggregator service with ``[publish] quantise = "int8"`` (FedBuff K = 1: each update makes a version);
site-a trains two versions and takes each from its int8 step (after the first, it drops its subscription to
the full weights); site-b joins at version 2, takes the full weights once (it holds no parent), and then both
take version 3 from its step. Every version each site holds is the aggregator's, bit for bit.
"""

from __future__ import annotations

import asyncio

import numpy as np

from aggregator.config import load_config
from aggregator.service import Aggregator
from edge.agent import EdgeAgent
from edge.config import load_edge_config
from fedline.testing.patience import bound
from tests.conftest import eventually
from tests.edge.helpers import Federation, write_aggregator, write_csv, write_site

STRATEGY = 'kind = "fedbuff"\nbuffer_size = 1\nmin_sites = 1\nmax_staleness = 10'
EXTRA = '[validation]\nmax_norm = 1000.0\n[publish]\nonnx = false\nquantise = "int8"'


def _same(agent: EdgeAgent, aggregator: Aggregator) -> bool:
    core = aggregator.core
    assert core is not None
    return agent.base.version == core.version and all(
        np.array_equal(agent.base.shared[k], v) for k, v in core.model.items()
    )


async def test_edges_follow_int8_steps_bit_for_bit_and_a_joiner_catches_up(mosquitto, tmp_path) -> None:
    fed = Federation.create(tmp_path, ["site-a", "site-b"])
    agg_toml = tmp_path / "aggregator.toml"
    write_aggregator(fed, mosquitto, agg_toml, strategy=STRATEGY, extra=EXTRA)
    aggregator = Aggregator(load_config(agg_toml))
    agg_task = asyncio.create_task(aggregator.run())
    agents: list[tuple[EdgeAgent, asyncio.Event, asyncio.Task]] = []

    def start(site: str) -> EdgeAgent:
        csv = write_csv(tmp_path / f"{site}.csv", 80, seed=len(agents))
        agent = EdgeAgent(
            load_edge_config(write_site(fed, site, csv, mosquitto.url, mosquitto.paths[f"password:{site}"]))
        )
        stop = asyncio.Event()
        agents.append((agent, stop, asyncio.create_task(agent.run(stop))))
        return agent

    try:
        await asyncio.wait_for(aggregator.started.wait(), bound(30))
        a = start("site-a")
        await eventually(lambda: a.base.manifest and a.sources_done, 30)
        # version 0's manifest says the versions come as steps: site-a takes the steps ahead, never version 1's
        # full weights (before, it subscribed to them ahead and got them beside the step)
        await eventually(lambda: not a.adopter.weights_subscribed and a.adopter.steps_subscribed, 10)
        assert a.base.manifest["steps"] is True
        for v in (1, 2):
            assert await a.train_once() is not None
            await eventually(lambda v=v: aggregator.published_version == v and _same(a, aggregator), 30)
        assert not a.adopter.weights_subscribed and a.adopter.follower.step_failures == 0  # by steps since v1
        assert a.adopter.follower.collector.received == 0  # not one chunk of full weights
        b = start("site-b")  # a joiner: it never held version 1, so version 2 comes as full weights
        await eventually(lambda: _same(b, aggregator), 30)
        assert await a.train_once() is not None
        await eventually(
            lambda: aggregator.published_version == 3 and _same(a, aggregator) and _same(b, aggregator), 30
        )
        assert not b.adopter.weights_subscribed and b.adopter.follower.step_failures == 0  # v3 by its step
    finally:
        for _agent, stop, _task in agents:
            stop.set()
        await asyncio.gather(*(t for *_, t in agents), return_exceptions=True)
        aggregator.stop()
        await asyncio.wait_for(agg_task, bound(60))
        for agent, *_ in agents:
            agent.close()
