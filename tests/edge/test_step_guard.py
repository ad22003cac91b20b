"""A signed global model that moved too far from the one in use is refused by the edge (models.step_bound)."""

from __future__ import annotations

import asyncio

import numpy as np

from edge.agent import EdgeAgent
from edge.config import load_edge_config
from models.step_bound import step_refusal
from tests.conftest import eventually, settings_for
from tests.edge.helpers import MiniAggregator
from tests.edge.test_edge_agent import _site, _stop


def test_the_bound_by_hand() -> None:
    cur = {"w": np.array([3.0, 4.0], np.float32), "b": np.zeros(1, np.float32)}  # ‖cur‖ = 5
    new = {"w": np.array([3.0, 10.0], np.float32), "b": np.zeros(1, np.float32)}  # step (0, 6): ‖step‖ = 6
    assert "max_step_relative 1" in step_refusal(cur, new, 1, 0.0, 1.0)  # 6 > 1 × 1 × 5
    assert step_refusal(cur, new, 2, 0.0, 1.0) is None  # two versions apart: 6 <= 1 × 2 × 5
    assert step_refusal(cur, new, 1, 0.0, 1.25) is None  # 6 <= 1.25 × 5 = 6.25
    assert "max_step_l2 5" in step_refusal(cur, new, 1, 5.0, 0.0)  # 6 > 5
    assert step_refusal(cur, new, 1, 6.0, 0.0) is None
    assert step_refusal(cur, new, 1, 0.0, 0.0) is None  # both off


async def test_edge_refuses_a_signed_model_that_jumped_and_says_so(mosquitto, tmp_path) -> None:
    fed, path = _site(tmp_path, mosquitto, n_rows=100)
    agent = EdgeAgent(load_edge_config(path))
    stop = asyncio.Event()
    async with MiniAggregator(fed, settings_for(mosquitto, "aggregator")) as agg:
        task = asyncio.create_task(agent.run(stop))
        await eventually(lambda: agent.client is not None and agent.client.connected.is_set(), timeout=60)
        norm = float(np.sqrt(sum(np.sum(np.square(v)) for v in agent.base.shared.values())))
        v1 = {k: v + 0.001 for k, v in agent.base.shared.items()}
        await agg.publish_model(1, agent.spec, v1)
        await eventually(lambda: agent.base.version == 1, timeout=60)
        # version 2 is signed by the aggregator, but moved by 30 × the model's norm (default bound 10)
        size = sum(v.size for v in v1.values())
        jump = {k: (v + 30.0 * norm / np.sqrt(size)).astype(np.float32) for k, v in v1.items()}  # ‖step‖ = 30 × ‖model‖
        await agg.publish_model(2, agent.spec, jump)
        await eventually(lambda: agent.metrics.models_refused_step._value.get() == 1, timeout=60)
        assert agent.base.version == 1 and "max_step_relative" in (agent.last_error or "")
        assert agent.status()["model_refused"] == {"version": 2, "reason": "step"}
        # a later honest version, within 2 versions' reach of the model in use, is adopted again
        await agg.publish_model(3, agent.spec, {k: v + 0.001 for k, v in v1.items()})
        await eventually(lambda: agent.base.version == 3, timeout=60)
        assert agent.metrics.models_refused_step._value.get() == 1
        await _stop(task, stop)
    agent.close()
