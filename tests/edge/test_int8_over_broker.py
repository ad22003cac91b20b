"""An edge configured for int8 updates and the real aggregator over a real Mosquitto.

The update is applied, and the global model it makes is within one quantisation
step (per coordinate: the step of the coordinate's block) of the model the
float32 delta would have made: x1 = x0 + delta with FedBuff K = 1, server_lr 1,
no clipping, worked out here from the edge's own float32 delta.
"""

from __future__ import annotations

import asyncio

import numpy as np

import edge.rounds
from aggregator.config import load_config
from aggregator.service import Aggregator
from edge.agent import EdgeAgent
from edge.config import load_edge_config
from fedline.testing.patience import bound
from tests.conftest import eventually
from tests.edge.helpers import Federation, write_aggregator, write_csv, write_site

STRATEGY = """kind = "fedbuff"
buffer_size = 1
min_sites = 1
server_lr = 1.0
norm_bound = 0
clip_to_median = false"""


async def test_an_int8_edge_is_applied_within_one_step_of_the_float_path(mosquitto, tmp_path, monkeypatch) -> None:
    sent: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []
    encode = edge.rounds.quantised.encode

    def recording_encode(tensors, encoding, rng=None):
        out = encode(tensors, encoding, rng)
        sent.append(({k: np.array(v) for k, v in tensors.items()}, out))
        return out

    monkeypatch.setattr(edge.rounds.quantised, "encode", recording_encode)
    fed = Federation.create(tmp_path, ["site-a"])
    agg_toml = tmp_path / "aggregator.toml"
    write_aggregator(fed, mosquitto, agg_toml, strategy=STRATEGY, extra="[validation]\nmax_norm = 1000.0")
    aggregator = Aggregator(load_config(agg_toml))
    agg_task = asyncio.create_task(aggregator.run())
    await asyncio.wait_for(aggregator.started.wait(), bound(30))
    path = write_site(
        fed, "site-a", write_csv(tmp_path / "a.csv", 200), mosquitto.url, mosquitto.paths["password:site-a"]
    )
    path.write_text(path.read_text() + '[update]\nquantise = "int8"\n')
    agent = EdgeAgent(load_edge_config(path))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await eventually(lambda: agent.base.manifest and agent.sources_done, 30)
        assert aggregator.core is not None
        x0 = {k: v.copy() for k, v in aggregator.core.model.items()}
        assert await agent.train_once() is not None
        await eventually(lambda: agent.outbox.depth()[0] == 0, 30)
        assert [e.state for e in agent.outbox.ledger()] == ["applied"]
        assert aggregator.core.version == 1
        ((float_delta, wire),) = sent
        assert set(wire) == {n for k in x0 for n in (k, f"{k}#scale")}
        assert all(wire[k].dtype == np.int8 for k in x0)
        for k, x in x0.items():
            steps = np.repeat(wire[f"{k}#scale"].astype(np.float64), 1024)[: x.size].reshape(x.shape)
            float_path = x.astype(np.float64) + float_delta[k]
            got = aggregator.core.model[k].astype(np.float64)
            assert np.all(np.abs(got - float_path) <= steps * (1 + 1e-5) + 1e-6), k
            assert np.any(got != float_path)  # it did go through the int8 values, not the float ones
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        aggregator.stop()
        await asyncio.wait_for(agg_task, bound(60))
        agent.close()
