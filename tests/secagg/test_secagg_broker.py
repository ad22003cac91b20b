"""Secure aggregation end to end: five real edge agents and the real aggregator over a real Mosquitto.

One site drops off right after its masked update went out, one joins and leaves without ever
submitting; only the three others answer (exactly the threshold). The published model must equal plain FedBuff over the four submitted deltas, computed
here from the paper's formula, to within the quantisation bound.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from aggregator.config import load_config
from aggregator.service import Aggregator
from broker_bridge.mosquitto import MosquittoProcess, mosquitto_binary
from edge.agent import EdgeAgent
from edge.config import load_edge_config
from edge.secagg_member import EdgeCohorts
from fedline.netproxy import TcpProxy
from fedline.testing.patience import bound
from tests.conftest import eventually
from tests.edge.helpers import FEDERATION, Federation, write_aggregator, write_csv, write_site

SITES = ["site-a", "site-b", "site-c", "site-d", "site-e"]
NORM_BOUND = 5.0


STRATEGY = f'kind = "fedbuff"\nsecure_aggregation = true\nnorm_bound = {NORM_BOUND}\nserver_lr = 1.0'
SECAGG = "[secagg]\ngather_s = 60.0\ndeadline_s = 300.0\nunmask_timeout_s = 60.0\n\n[publish]\nonnx = false"


@pytest.fixture
def broker5(tmp_path):
    if mosquitto_binary() is None:
        pytest.fail("this test needs the mosquitto broker: apt-get install mosquitto")
    broker = MosquittoProcess(tmp_path / "broker", federation=FEDERATION, sites=SITES)
    broker.start()
    yield broker
    broker.stop()


@pytest.mark.broker
async def test_five_sites_one_drops_after_submitting_one_never_submits(broker5, tmp_path, monkeypatch) -> None:
    fed = Federation.create(tmp_path, SITES)
    # what each site masked (a spy around the real method; the wire only carries masked vectors)
    masked_inputs: dict[str, dict[str, np.ndarray]] = {}
    real_seal = EdgeCohorts.seal

    def spy(self, header, delta):
        masked_inputs[header.site] = {k: np.array(v, dtype=np.float64) for k, v in delta.items()}
        return real_seal(self, header, delta)

    monkeypatch.setattr(EdgeCohorts, "seal", spy)

    # site-d and site-e reach the broker through a proxy that can cut them off the network
    proxies = {s: await TcpProxy(broker5.port, name=s).start() for s in ("site-d", "site-e")}
    agents, tasks, stops = {}, {}, {}
    for i, site in enumerate(SITES):
        csv = write_csv(tmp_path / f"{site}.csv", 200, seed=i)
        training = {"every_s": 1.0}
        if site == "site-e":
            training["min_rows"] = 100_000  # in the cohort, but never trains: never submits
        path = write_site(
            fed,
            site,
            csv,
            proxies[site].url if site in proxies else broker5.url,
            broker5.paths[f"password:{site}"],
            training=training,
            extra={"secure_aggregation": True},
        )
        agents[site] = EdgeAgent(load_edge_config(path))
        stops[site] = asyncio.Event()
        tasks[site] = asyncio.create_task(agents[site].run(stops[site]))
    await eventually(lambda: all(a.sources_done for a in agents.values()), 60)

    agg_toml = tmp_path / "aggregator.toml"
    write_aggregator(fed, broker5, agg_toml, client_id="agg-secagg", strategy=STRATEGY, extra=SECAGG)
    aggregator = Aggregator(load_config(agg_toml))
    agg_task = asyncio.create_task(aggregator.run())
    try:
        await asyncio.wait_for(aggregator.started.wait(), bound(30))
        base = {k: np.array(v, dtype=np.float64) for k, v in aggregator.core.model.items()}
        # site-e joins the cohort, then drops off the network for good without submitting
        e = agents["site-e"]
        await eventually(lambda: e.cohorts.pending is not None, 120)
        proxies["site-e"].cut()
        # site-d drops off the network right after its masked update is held by the aggregator
        d = agents["site-d"]
        await eventually(lambda: any(x.state == "buffered" for x in d.outbox.ledger()), 180)
        proxies["site-d"].cut()

        a = agents["site-a"]
        await eventually(lambda: a.base.version >= 1 and a.base.manifest, 180)
        published = a.base.shared

        lineage = aggregator.core.lineage(1)
        assert lineage["strategy"] == "fedbuff-secagg"
        assert lineage["dropped"] == ["site-e"] and lineage["silent"] == ["site-d"]
        assert sorted(u["site"] for u in lineage["updates"]) == ["site-a", "site-b", "site-c", "site-d"]
        assert sorted(masked_inputs) == ["site-a", "site-b", "site-c", "site-d"]
        stats = aggregator.cohorts.stats
        assert stats["cohorts"] == 1 and stats["cohorts_failed"] == 0 and stats["min_cohort_sites"] == 4
        assert stats["dropouts_recovered"] == 2  # site-e never submitted, site-d never answered

        # plain FedBuff of the four (Nguyen et al. Alg. 1 with the per-site norm bound, staleness 0: f = 1):
        # x1 = x0 + server_lr * (1/K) * sum_i clip(delta_i), clip(d) = d * min(1, bound / ||d||)
        def clip(delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            norm = np.sqrt(sum(float((v**2).sum()) for v in delta.values()))
            return {k: v * min(1.0, NORM_BOUND / norm) for k, v in delta.items()}

        clipped = [clip(masked_inputs[s]) for s in sorted(masked_inputs)]
        expected = {k: base[k] + sum(c[k] for c in clipped) / 4 for k in base}
        # quantisation: |sum error| < n / scale = n^2 R / (2^31 - 1 - n) per coordinate (n = 5 members,
        # R = the norm bound), divided by K = 4; plus float32 rounding of the published weights
        q_bound = 5 * 5 * NORM_BOUND / (2**31 - 1 - 5) / 4
        moved = 0.0
        for k in expected:
            got = np.asarray(published[k], dtype=np.float64)
            tol = q_bound + 2 * np.finfo(np.float32).eps * np.abs(expected[k]).max()
            assert np.abs(got - expected[k]).max() <= tol, k
            moved = max(moved, float(np.abs(expected[k] - base[k]).max()))
        assert moved > 100 * q_bound  # the model really moved: the check above is not vacuous

        # every submitter that stayed got its "applied" receipt
        for s in ("site-a", "site-b", "site-c"):
            await eventually(lambda s=s: any(e.state == "applied" for e in agents[s].outbox.ledger()), 30)
    finally:
        for s in SITES:
            stops[s].set()
        _, stuck = await asyncio.wait(list(tasks.values()), timeout=120)
        for t in stuck:  # e.g. a round's thread still running: do not let teardown hang
            t.cancel()
        aggregator.stop()
        await asyncio.wait_for(agg_task, bound(120))
        for p in proxies.values():
            await p.stop()
        for ag in agents.values():
            ag.close()
