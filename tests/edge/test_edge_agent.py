"""The edge agent against a real Mosquitto and a minimal (real-on-the-wire) aggregator."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest
from opacus.accountants import RDPAccountant

from broker_bridge.client import MqttClient
from broker_bridge.keys import KeyPair
from broker_bridge.topics import Topics
from edge.agent import EdgeAgent
from edge.config import load_edge_config
from fedline.testing.patience import bound
from tests.conftest import eventually, settings_for
from tests.edge.helpers import FEDERATION, Federation, MiniAggregator, write_csv, write_site

SITE = "site-a"


def _site(tmp_path, mosquitto, n_rows=300, **kw):
    fed = Federation.create(tmp_path, [SITE])
    csv = write_csv(tmp_path / "rows.csv", n_rows)
    path = write_site(fed, SITE, csv, mosquitto.url, mosquitto.paths[f"password:{SITE}"], **kw)
    return fed, path


async def until(pred, task: asyncio.Task, timeout: float = 30.0):
    """``eventually``, failing at once with the agent's own error if the agent task died."""

    def check():
        if task.done():
            task.result()
            raise AssertionError("the agent stopped")
        return pred()

    return await eventually(check, timeout=timeout)


async def _stop(task: asyncio.Task, stop: asyncio.Event) -> None:
    stop.set()
    await asyncio.wait_for(task, bound(60))  # bounded inside by the agent's own join, which logs a stuck task


async def test_agent_trains_on_csv_and_its_sealed_deltas_arrive_open_and_clear(mosquitto, tmp_path) -> None:
    fed, path = _site(tmp_path, mosquitto, training={"every_rows": 100}, source={"rate_hz": 150.0})
    text = path.read_text().replace("[metrics]", "[metrics]\nport = 0")
    path.write_text(text)
    agent = EdgeAgent(load_edge_config(path))
    stop = asyncio.Event()
    statuses: list[dict] = []
    observer = MqttClient(settings_for(mosquitto, "observer"))
    async with observer, MiniAggregator(fed, settings_for(mosquitto, "aggregator")) as agg:
        await observer.subscribe(Topics(FEDERATION).status(SITE))

        async def watch() -> None:
            async for m in observer.messages():
                statuses.append(json.loads(m.payload))

        watcher = asyncio.create_task(watch())
        task = asyncio.create_task(agent.run(stop))
        await until(lambda: len(agg.arrivals) >= 2, task, timeout=60)
        # the replay ends, so the rounds (one per 100 new rows) end: wait until the last one is sealed and
        # applied, twice over a pause, so the ε compared below is not moving under the comparison
        await until(lambda: agent.sources_done, task, timeout=60)

        def settled() -> bool:
            return (
                agent.outbox.depth()[0] == 0
                and len(agent.outbox.ledger()) == len(agg.arrivals)
                and all(e.state == "applied" for e in agent.outbox.ledger())
            )

        await eventually(settled, timeout=30)
        await asyncio.sleep(2.0)
        await eventually(settled, timeout=30)

        # the deltas open with the aggregator's key, carry only shared parameters, and are not zero
        shared = set(agent.shared_names)
        assert agent.personal_names == ["head.weight", "head.bias"]
        for a in agg.arrivals:
            assert set(a.tensors) == shared
            assert not any(name.startswith("head.") for name in a.tensors)
            assert any(np.abs(v).sum() > 0 for v in a.tensors.values())
        assert agg.counters(SITE) == list(range(1, len(agg.arrivals) + 1))

        # ε in every header is what Opacus's own accountant says for the same σ, q and steps
        acc = RDPAccountant()
        for a in agg.arrivals:
            p = a.header.privacy
            assert p["mode"] == "dp-sgd" and p["noise_multiplier"] == 1.0 and p["delta"] == 1e-5
            for _ in range(p["steps"]):
                acc.step(noise_multiplier=p["noise_multiplier"], sample_rate=p["sample_rate"])
            assert p["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
        assert agent.epsilon == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)

        # the retained status and the metrics say the same; the status carries nothing computed from plant data
        # (ε and an outbox depth of 0/1 go with the next status, at most edge.status_publisher.SOFT_DELAY_S later)
        await eventually(
            lambda: (
                statuses
                and statuses[-1]["outbox_depth"] == 0
                and statuses[-1]["version"] >= 0
                and abs(statuses[-1]["epsilon"] - agent.epsilon) <= 1e-5 * agent.epsilon
            ),
            timeout=10,
        )
        last = statuses[-1]
        from edge.status_doc import STATUS_FIELDS

        # no rows, losses, accuracy, counter (model_refused appears only after a refused model: models.step_bound)
        assert set(last) == set(STATUS_FIELDS) - {"model_refused"}, last
        # update topics name no counter: message ids are 64 random bits (the counter is in the sealed header)
        ids = [a.header.msg_id for a in agg.arrivals]
        assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids) and len(set(ids)) == len(ids), ids
        assert last["state"] == "online" and last["privacy"] == "on" and last["publishing"] == "ok"
        assert last["epsilon"] == pytest.approx(agent.epsilon, rel=1e-5)
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=5).read().decode()
        )
        assert "fedline_edge_outbox_depth 0.0" in body
        assert f"fedline_edge_updates_sealed_total {float(len(agg.arrivals))}" in body
        assert 'fedline_edge_receipts_total{verdict="applied"}' in body
        assert "process_resident_memory_bytes" in body and "process_cpu_seconds_total" in body

        # the personalised ONNX for the line is in the model directory and runs
        pointer = json.loads((agent.store.model_dir / "current.json").read_text())
        session = ort.InferenceSession(str(agent.store.model_dir / pointer["file"]), providers=["CPUExecutionProvider"])
        (y,) = session.run(["y"], {"x": np.full((4, 3), 0.5, np.float32)})
        assert y.shape == (4, 1) and ((y >= 0) & (y <= 1)).all()

        await _stop(task, stop)
        await eventually(lambda: statuses[-1]["state"] == "offline", timeout=10)
        watcher.cancel()


async def test_agent_follows_signed_models_and_refuses_bad_ones(mosquitto, tmp_path) -> None:
    fed, path = _site(tmp_path, mosquitto, n_rows=200)
    agent = EdgeAgent(load_edge_config(path))
    stop = asyncio.Event()
    async with MiniAggregator(fed, settings_for(mosquitto, "aggregator")) as agg:
        task = asyncio.create_task(agent.run(stop))
        await eventually(lambda: agent.client is not None and agent.client.connected.is_set(), timeout=20)
        await eventually(lambda: agent.sources_done, timeout=20)
        v1 = {k: v + 0.25 for k, v in agent.base.shared.items()}
        await agg.publish_model(1, agent.spec, v1)
        await eventually(lambda: agent.base.version == 1, timeout=20)
        assert all(np.array_equal(agent.base.shared[k], v1[k]) for k in v1)
        current = agent.store.model_dir / "current.json"
        await eventually(lambda: json.loads(current.read_text())["version"] == 1, timeout=20)

        # a corrupted chunk (hash mismatch) and a manifest signed by another key are refused; v1 stays
        await agg.publish_model(2, agent.spec, {k: v + 1 for k, v in v1.items()}, tamper=True)
        await eventually(lambda: agent.metrics.models_refused._value.get() >= 1, timeout=20)
        await agg.publish_model(3, agent.spec, v1, keys=KeyPair.generate("aggregator", "aggregator"))
        await eventually(lambda: agent.metrics.models_refused._value.get() >= 2, timeout=20)
        assert agent.base.version == 1
        assert "refused" in (agent.last_error or "")

        # the next round rebases on version 1
        await agent.train_once()
        await eventually(lambda: len(agg.arrivals) == 1, timeout=20)
        assert agg.arrivals[0].header.base_version == 1
        await _stop(task, stop)
    agent.close()

    # a restart keeps the last good model (re-verified from disk)
    again = EdgeAgent(load_edge_config(path))
    assert again.base.version == 1
    again.close()
