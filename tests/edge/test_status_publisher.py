"""The edge's status: sent when what it says changes (and on the heartbeat), not on every wake-up."""

from __future__ import annotations

import asyncio
import json

from broker_bridge.client import MqttClient
from broker_bridge.topics import Topics
from edge.agent import EdgeAgent
from edge.config import load_edge_config
from edge.status_publisher import SOFT_DELAY_S, StatusSchedule
from fedline.testing.patience import bound
from tests.conftest import eventually, settings_for
from tests.edge.helpers import FEDERATION, Federation, write_csv, write_site

SITE = "site-a"


class Clock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


def _doc(**kw) -> dict:
    doc = {"state": "online", "version": 3, "epoch": 1, "privacy": "on", "epsilon": 1.0, "publishing": "ok"}
    return {**doc, "outbox_depth": 0, "ts": 0.0, **kw}


def test_a_status_goes_at_once_on_a_hard_change_and_not_again_until_the_heartbeat() -> None:
    clock = Clock()
    s = StatusSchedule(heartbeat_s=60.0, clock=clock)
    assert s.wait_s(_doc()) == 0.0  # nothing sent yet
    s.sent(_doc())
    clock.t += 1.0
    assert s.wait_s(_doc(ts=9.9)) == 59.0  # the same content (ts does not count): the heartbeat's time
    for hard in ({"version": 4}, {"epoch": 2}, {"state": "offline"}, {"publishing": "outbox_full"}):
        assert s.wait_s(_doc(**hard)) == 0.0, hard
    assert s.wait_s(_doc(model_refused={"version": 4, "reason": "step"})) == 0.0
    clock.t += 59.0
    assert s.wait_s(_doc()) == 0.0  # the heartbeat
    s.reset()  # a reconnect
    assert s.wait_s(_doc()) == 0.0


def test_a_change_of_epsilon_or_a_0_1_outbox_depth_waits_for_the_next_status_at_most_the_soft_delay() -> None:
    clock = Clock()
    s = StatusSchedule(heartbeat_s=60.0, clock=clock)
    s.sent(_doc())
    assert s.wait_s(_doc(epsilon=1.2, outbox_depth=1)) == SOFT_DELAY_S  # a round: ε spent, its update out
    clock.t += 0.5
    assert s.wait_s(_doc(epsilon=1.2)) == SOFT_DELAY_S - 0.5  # its receipt: the delay counts from the first
    assert s.wait_s(_doc(epsilon=1.2, version=4)) == 0.0  # the next version takes the soft change with it
    clock.t += SOFT_DELAY_S
    assert s.wait_s(_doc(epsilon=1.2)) == 0.0
    s.sent(_doc(epsilon=1.2))
    assert s.wait_s(_doc(epsilon=1.2)) == 60.0
    # an outbox that backs up shows at once: 2 waiting, then 4 (0-1, 2-3, 4-7 ... are the buckets)
    assert s.wait_s(_doc(epsilon=1.2, outbox_depth=2)) == 0.0
    s.sent(_doc(epsilon=1.2, outbox_depth=2))
    assert s.wait_s(_doc(epsilon=1.2, outbox_depth=3)) == SOFT_DELAY_S
    assert s.wait_s(_doc(epsilon=1.2, outbox_depth=4)) == 0.0
    assert s.wait_s(_doc(epsilon=1.2, outbox_depth=1)) == 0.0  # and so does a backlog that clears


async def test_the_agent_sends_no_status_that_repeats_the_last_one(mosquitto, tmp_path) -> None:
    """Real Mosquitto: wake-ups of the status task that change nothing send nothing; a change is sent, in order."""
    fed = Federation.create(tmp_path, [SITE])
    csv = write_csv(tmp_path / "rows.csv", 200)
    path = write_site(fed, SITE, csv, mosquitto.url, mosquitto.paths[f"password:{SITE}"])
    path.write_text(path.read_text().replace("status_interval_s = 1.0", "status_interval_s = 3600.0"))
    agent = EdgeAgent(load_edge_config(path))
    st = agent.state
    statuses: list[dict] = []
    observer = MqttClient(settings_for(mosquitto, "observer"))
    stop = asyncio.Event()
    async with observer:
        await observer.subscribe(Topics(FEDERATION).status(SITE))

        async def watch() -> None:
            async for m in observer.messages():
                statuses.append(json.loads(m.payload))

        watcher = asyncio.create_task(watch())
        task = asyncio.create_task(agent.run(stop))
        try:
            await eventually(lambda: statuses and statuses[-1]["state"] == "online", timeout=30)
            st.model_refused = {"version": 9, "reason": "step"}
            st.changed()
            await eventually(lambda: statuses[-1].get("model_refused", {}).get("version") == 9, timeout=10)
            first = len(statuses)
            for _ in range(10):  # wake the status task with nothing changed; wait until it has looked each time
                st.changed()
                await eventually(lambda: not st.status_dirty.is_set(), timeout=10)
                await asyncio.sleep(0.3)  # past the coalescing pause, so each wake-up is one look
            st.model_refused = {"version": 10, "reason": "step"}
            st.changed()
            await eventually(lambda: statuses[-1].get("model_refused", {}).get("version") == 10, timeout=10)
            assert len(statuses) == first + 1, statuses[first - 1 :]  # nothing between the two changes
            assert statuses[-1]["state"] == "online" and statuses[-1]["version"] == statuses[first - 1]["version"]
        finally:
            stop.set()
            await asyncio.wait_for(task, bound(60))
            watcher.cancel()
            agent.close()
