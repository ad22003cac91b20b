"""The broker's queue limit drops part of an update queued for the offline aggregator; the outbox resends it.

Mosquitto's ``max_queued_messages`` bounds what it holds for an offline persistent client (issue 13: an
offline client must not be able to make the broker hold gigabytes). Past the limit it drops and counts,
after it has already acknowledged the publish to the sender. So the edge cannot learn from its PUBACK that
its update was lost; it learns from the missing receipt, and resends. This test makes that happen with the
real aggregator and edge over a real Mosquitto whose limit is a few chunks, and checks the ledger: the
update is applied exactly once, and the broker counted what it dropped.
"""

from __future__ import annotations

import asyncio

from aggregator.config import load_config
from aggregator.service import Aggregator
from broker_bridge.mosquitto import MosquittoProcess
from edge.agent import EdgeAgent
from edge.config import load_edge_config
from fedline.testing.patience import bound
from tests.conftest import eventually
from tests.edge.helpers import FEDERATION, Federation, write_aggregator, write_csv, write_site

SITE = "site-a"
HIDDEN = [64, 64]  # about 4.5k parameters: an 18 kB update, so ~20 chunks of 1 kB against a queue of 4
QUEUE_LIMIT = 4


async def _start(path) -> tuple[Aggregator, asyncio.Task]:
    agg = Aggregator(load_config(path))
    task = asyncio.create_task(agg.run())
    await asyncio.wait_for(agg.started.wait(), bound(30))
    return agg, task


async def _stop(agg: Aggregator, task: asyncio.Task) -> None:
    agg.stop()
    await asyncio.wait_for(task, bound(60))


async def test_update_dropped_by_the_queue_limit_is_resent_and_applied_once(tmp_path) -> None:
    broker = MosquittoProcess(
        tmp_path / "broker", federation=FEDERATION, sites=[SITE], max_queued_messages=QUEUE_LIMIT, sys_interval_s=1
    )
    broker.start()
    fed = Federation.create(tmp_path, [SITE])
    agg_toml = tmp_path / "aggregator.toml"
    write_aggregator(fed, broker, agg_toml, hidden=HIDDEN, client_id="agg-queue")
    agg, agg_task = await _start(agg_toml)
    csv = write_csv(tmp_path / f"{SITE}.csv", 200, seed=0)
    site_toml = write_site(
        fed,
        SITE,
        csv,
        broker.url,
        broker.paths[f"password:{SITE}"],
        model={"hidden": HIDDEN},
        broker={"max_chunk": 1024},
        outbox={"resend_after_s": 2.0},
    )
    agent = EdgeAgent(load_edge_config(site_toml))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await eventually(lambda: agent.base.manifest is not None and agent.sources_done, 30)
        await _stop(agg, agg_task)  # offline; its persistent session makes the broker queue for it

        msg_id = await agent.train_once()
        assert msg_id is not None
        await eventually(lambda: agent.outbox.ledger()[-1].state == "sent", 20)  # every chunk acknowledged
        log = broker.workdir / "mosquitto.log"
        await eventually(lambda: "Outgoing messages are being dropped for client agg-queue" in log.read_text(), 10)

        agg, agg_task = await _start(agg_toml)  # gets at most QUEUE_LIMIT chunks: a partial update
        await eventually(lambda: agent.outbox.ledger()[-1].state == "applied", 60)
        ledger = agent.outbox.ledger()
        assert [(e.msg_id, e.state) for e in ledger] == [(msg_id, "applied")]
        assert agent.outbox.depth()[0] == 0
        assert agent.metrics.published._value.get() >= 2  # the first send lost chunks; a resend completed it
        # the aggregator applied it once: one version made from it, and the site's counters hold it once
        await eventually(lambda: agg.published_version == 1, 20)
        verdicts = [(v.site, v.counter, v.msg_id, v.verdict) for v in agg.core.store.verdicts()]
        assert verdicts == [(SITE, 1, msg_id, "applied")]
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        agent.close()
        if not agg_task.done():
            await _stop(agg, agg_task)
        broker.stop()
