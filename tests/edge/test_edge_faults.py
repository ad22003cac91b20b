"""Nothing lost offline, nothing sent twice: broker outage, and kill -9 of the agent."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from broker_bridge.client import MqttClient
from broker_bridge.topics import Topics
from edge.agent import EdgeAgent
from edge.config import load_edge_config
from fedline.testing.patience import bound
from tests.conftest import eventually, settings_for
from tests.edge.helpers import FEDERATION, Federation, MiniAggregator, write_csv, write_site
from tests.edge.test_edge_agent import until

SITE = "site-b"


async def test_broker_down_then_back_every_update_arrives_in_order_once(mosquitto, tmp_path) -> None:
    fed = Federation.create(tmp_path, [SITE])
    csv = write_csv(tmp_path / "rows.csv", 200)
    path = write_site(fed, SITE, csv, mosquitto.url, mosquitto.paths[f"password:{SITE}"], privacy="off")
    agent = EdgeAgent(load_edge_config(path))
    stop = asyncio.Event()
    agg_settings = settings_for(mosquitto, "aggregator", client_id="agg-outage")
    async with MiniAggregator(fed, agg_settings) as agg:
        task = asyncio.create_task(agent.run(stop))
        await until(lambda: agent.sources_done and agent.client.connected.is_set(), task, timeout=30)
        assert await agent.train_once() is not None
        await until(lambda: agg.counters(SITE) == [1] and agent.outbox.depth()[0] == 0, task)

        await asyncio.to_thread(mosquitto.stop)
        await until(lambda: not agent.client.connected.is_set(), task)
        for _ in range(3):  # the plant keeps working while the broker is away
            assert await agent.train_once() is not None
        assert [r.counter for r in agent.outbox.pending(900)] == [2, 3, 4]
        assert {e.state for e in agent.outbox.ledger()[1:]} == {"queued"}

        await asyncio.to_thread(mosquitto.start)
        await until(lambda: agent.outbox.depth()[0] == 0, task, timeout=40)
        await asyncio.sleep(1.0)  # anything sent twice would show up now
        assert agg.counters(SITE) == [1, 2, 3, 4]
        assert set(agg.raw_chunks.values()) == {1}
        assert [e.state for e in agent.outbox.ledger()] == ["applied"] * 4
        stop.set()
        await asyncio.wait_for(task, bound(20))
    agent.close()


def _ledger(db: Path) -> list[tuple[int, str, str]]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT counter, state, msg_id FROM ledger ORDER BY counter").fetchall()
    except sqlite3.OperationalError:
        return []


def _outbox_depth(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
        return con.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]


def _start_agent(path: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedline.cli", "edge", "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "ab"),
        start_new_session=True,
    )


async def test_kill_9_with_a_full_outbox_then_restart_loses_nothing_and_sends_nothing_twice(
    mosquitto, tmp_path
) -> None:
    """The aggregator is away (its persistent session queues what arrives); the agent seals,
    publishes its first update (which waits for a receipt) and queues the next ones, and is
    killed with -9; after a restart every sealed update reaches the aggregator exactly once,
    in counter order: the one already sent is not sent again."""
    fed = Federation.create(tmp_path, [SITE])
    csv = write_csv(tmp_path / "rows.csv", 400)
    path = write_site(
        fed,
        SITE,
        csv,
        mosquitto.url,
        mosquitto.paths[f"password:{SITE}"],
        privacy="off",
        training={"every_rows": 60, "every_s": 1.0},
        source={"rate_hz": 80.0},
    )
    db = path.parent / "state" / "outbox.sqlite"
    log = tmp_path / "agent.log"
    agg_settings = settings_for(mosquitto, "aggregator", client_id="agg-kill")
    async with MiniAggregator(fed, agg_settings):
        pass  # registers the aggregator's persistent session and subscription, then leaves

    statuses: list[dict] = []
    observer = MqttClient(settings_for(mosquitto, "observer"))
    await observer.__aenter__()
    await observer.subscribe(Topics(FEDERATION).status(SITE))

    async def watch() -> None:
        async for m in observer.messages():
            statuses.append(json.loads(m.payload))

    watcher = asyncio.create_task(watch())
    proc = _start_agent(path, log)
    try:

        def sent_and_queued() -> bool:
            states = [s for _, s, _ in _ledger(db)]
            return states[:1] == ["sent"] and states.count("queued") >= 1

        await eventually(sent_and_queued, timeout=60)
        await eventually(lambda: statuses and statuses[-1]["state"] == "online", timeout=20)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(bound(10))
        before = _ledger(db)
        assert [s for _, s, _ in before][:1] == ["sent"] and len(before) >= 2
        # the broker publishes the agent's last will: the retained status says offline
        await eventually(lambda: statuses[-1] == {"state": "offline", "reason": "connection lost"}, 20)

        proc = _start_agent(path, log)
        async with MiniAggregator(fed, agg_settings) as agg:

            def settled() -> bool:
                led = _ledger(db)
                return (
                    len(led) > len(before)
                    and _outbox_depth(db) == 0
                    and len(agg.arrivals) == len(led)
                    and all(s == "applied" for _, s, _ in led)
                )

            await eventually(settled, timeout=90)
            proc.send_signal(signal.SIGTERM)
            proc.wait(bound(20))
            await asyncio.sleep(0.5)
            counters = agg.counters(SITE)
            assert counters == list(range(1, len(counters) + 1))  # each once, in order, none missing
            assert counters[: len(before)] == [c for c, _, _ in before]
            # nothing the broker had acknowledged was published again; only an update caught
            # mid-publish by the kill (still 'queued') may have had chunks sent twice
            twice = {m for (m, _), n in agg.raw_chunks.items() if n > 1}
            state = {m: s for _, s, m in before}
            assert len(twice) <= 1 and all(state.get(m) == "queued" for m in twice), (twice, state)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        watcher.cancel()
        await observer.close()
    assert proc.returncode == 0, log.read_text()[-2000:]
