"""A federation through a two-node RabbitMQ cluster: the real aggregator, three real edge agents, MQTT 3.1.1.

The aggregator and two sites use node 0; the third site joins through node 1
after version 0 was published, so it never sees the retained grant or
manifest (RabbitMQ keeps retained messages per node). It still gets them: its
status says it holds no key and an older version, and the aggregator's
catch-up publishes the current state again, live, to every node. Then every
site trains, and the ledgers reconcile: each sealed update applied once.
"""

from __future__ import annotations

import asyncio

import pytest

from aggregator.config import load_config
from aggregator.service import Aggregator
from broker_bridge.rabbitmq import RabbitCluster
from edge.agent import EdgeAgent
from edge.config import load_edge_config
from fedline.testing.patience import bound
from tests.cluster.conftest import SITES
from tests.conftest import eventually
from tests.edge.helpers import Federation, write_aggregator, write_csv, write_site

V311 = {"protocol": "3.1.1"}


@pytest.mark.rabbitmq
async def test_federation_over_a_two_node_cluster_with_a_site_that_missed_the_retained_state(
    cluster: RabbitCluster, tmp_path
) -> None:
    fed = Federation.create(tmp_path, SITES)
    agg_toml = tmp_path / "aggregator.toml"
    write_aggregator(
        fed,
        None,
        agg_toml,
        client_id="agg-cluster",
        strategy='kind = "fedbuff"\nbuffer_size = 3\nmin_sites = 3',
        url=cluster.members[0].url,
        password_file=cluster.password_file("aggregator"),
        broker_extra='protocol = "3.1.1"',
        aggregator_extra="catchup_interval_s = 1.0",
    )
    aggregator = Aggregator(load_config(agg_toml))
    agg_task = asyncio.create_task(aggregator.run())
    await asyncio.wait_for(aggregator.started.wait(), bound(60))
    await asyncio.wait_for(aggregator.published.wait(), bound(60))  # version 0 is retained on node 0 only

    agents: dict[str, EdgeAgent] = {}
    tasks, stop = [], asyncio.Event()
    for i, site in enumerate(SITES):
        node = 1 if site == "site-c" else 0
        csv = write_csv(tmp_path / f"{site}.csv", 200, seed=i)
        path = write_site(
            fed, site, csv, cluster.members[node].url, cluster.password_file(site), broker={**V311, "timeout_s": 10.0}
        )
        agents[site] = EdgeAgent(load_edge_config(path))
        tasks.append(asyncio.create_task(agents[site].run(stop)))
    try:
        # site-c holds the key and version 0 only thanks to the catch-up (node 1 never had them retained)
        await eventually(
            lambda: (
                all(len(a.keyring) > 0 and a.base.manifest for a in agents.values())
                and all(a.sources_done for a in agents.values())
            ),
            90,
        )
        # the counter moves once the whole answer (grant, manifest, every model chunk) is published, which
        # can be just after site-c already holds what it needs from the first messages of that answer
        await eventually(lambda: aggregator.metrics.catchups._value.get() >= 1, 30)
        for round_ in range(2):
            for a in agents.values():
                assert await a.train_once() is not None
            await eventually(lambda: all(a.outbox.depth()[0] == 0 for a in agents.values()), 90)
            await eventually(lambda r=round_: aggregator.published_version >= r + 1, 60)
            await eventually(lambda r=round_: all(a.base.version >= r + 1 for a in agents.values()), 90)
        # ledger-exact: every sealed update applied exactly once, in a version of three distinct sites
        # (a buffered update's "applied" receipt follows the version's publication: wait for it)
        await eventually(
            lambda: all([e.state for e in a.outbox.ledger()] == ["applied", "applied"] for a in agents.values()), 60
        )
        for site, a in agents.items():
            ledger = a.outbox.ledger()
            assert [e.state for e in ledger] == ["applied", "applied"], (site, ledger)
        assert aggregator.core is not None
        for version in (1, 2):
            lineage = aggregator.core.lineage(version)
            assert lineage is not None
            assert sorted(u["site"] for u in lineage["updates"]) == SITES, lineage
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), bound(30))
        aggregator.stop()
        await asyncio.wait_for(agg_task, bound(60))  # a model export may be under way
        for a in agents.values():
            a.close()
