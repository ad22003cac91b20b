"""A site whose data directory is lost asks the real aggregator (over a real Mosquitto) before it publishes.

The short variant of ``tests/faults/test_lost_data_dir.py`` (processes, slow): the aggregator service and
two edge agents in this process, the second on the first one's keys with an empty data directory.
"""

from __future__ import annotations

import asyncio
import shutil

from aggregator.config import load_config
from aggregator.service import Aggregator
from edge.agent import EdgeAgent
from edge.config import load_edge_config
from tests.conftest import eventually
from tests.edge.helpers import Federation, write_aggregator, write_csv, write_site


async def test_a_site_with_a_lost_data_dir_resumes_from_the_aggregators_answer(mosquitto, tmp_path) -> None:
    fed = Federation.create(tmp_path, ["site-a"])
    write_aggregator(fed, mosquitto, tmp_path / "aggregator.toml")
    with (tmp_path / "aggregator.toml").open("a") as fh:
        fh.write("[publish]\nonnx = false\n")  # the edge builds its own ONNX; exporting costs seconds here
    aggregator = Aggregator(load_config(tmp_path / "aggregator.toml"))
    agg_task = asyncio.create_task(aggregator.run())
    await asyncio.wait_for(aggregator.started.wait(), 30)
    csv = write_csv(tmp_path / "rows.csv", 200)
    path = write_site(
        fed,
        "site-a",
        csv,
        mosquitto.url,
        mosquitto.paths["password:site-a"],
        outbox={"max_count": 20},
        recovery={"ask_aggregator": True, "resend_s": 1.0},
    )

    async def run(agent: EdgeAgent, stop: asyncio.Event) -> asyncio.Task:
        task = asyncio.create_task(agent.run(stop))
        await eventually(lambda: agent.recovery is None and agent.sources_done and agent.base.manifest, 60)
        return task

    try:
        first, stop = EdgeAgent(load_edge_config(path)), asyncio.Event()
        task = await run(first, stop)
        assert first.outbox.last_counter() == 0  # a new site: the aggregator knew nothing of it
        assert await first.train_once() is not None  # (the answer may have started a round already)
        await eventually(lambda: first.outbox.depth()[0] == 0, 60)
        n = len(first.outbox.ledger())
        assert n >= 1 and {e.state for e in first.outbox.ledger()} == {"applied"}
        eps = first.epsilon
        stop.set()
        await task
        first.close()
        shutil.rmtree(tmp_path / "site-a" / "state")  # the disk is gone

        second, stop = EdgeAgent(load_edge_config(path)), asyncio.Event()
        assert second.recovery is not None and second.publishing == "recovering"
        assert await second.train_once() is None  # nothing before the answer: counter and ε unknown
        assert second.outbox.ledger() == []
        task = await run(second, stop)
        resumed = second.outbox.ledger()  # a round may have followed the answer at once
        assert second.outbox.last_counter() == n + 20 + len(resumed)  # after the lost outbox's bound (max_count)
        assert second.epsilon >= eps > 0 and second.ledger.releases >= n  # ε does not restart at 0
        assert second.status()["epsilon"] >= eps and second.publishing == "ok"
        assert await second.train_once() is not None
        await eventually(lambda: second.outbox.depth()[0] == 0, 60)
        new = second.outbox.ledger()
        assert new[0].counter == n + 21 and all(e.state == "applied" and e.epsilon >= eps for e in new)  # no replay
        assert aggregator.metrics.value("fedline_aggregator_recovery_requests_total", {"outcome": "answered"}) >= 2
        stop.set()
        await task
        second.close()
    finally:
        stop.set()
        aggregator.stop()
        await asyncio.wait_for(agg_task, 60)
