"""The plant tier end to end: two plants x three lines over three Mosquittos, and a cut of one plant's uplink.

Real brokers, the real central aggregator and plant aggregators as processes
(``fedline aggregator``, ``fedline plant``), real edge agents as the lines.
Each line trains one round per phase (the test paces them):

1. all links up: both plants reduce their lines, send one delta each; central makes two versions;
2. plant-a's link to the central broker is cut: plant-a's lines still get their receipts from
   their plant (its broker does not depend on the link), its delta waits in its outbox; plant-b's goes on;
3. the link is back: plant-a's delta goes out once, central makes its version, every line follows it.

Then the ledgers reconcile at both tiers: every line update applied exactly once
at its plant, every plant delta applied exactly once centrally, and each line
holds the central weights of the newest version, named in its plant's signed manifest.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import numpy as np
import pytest

from broker_bridge.mosquitto import MosquittoProcess
from edge.agent import EdgeAgent
from edge.config import load_edge_config
from fedline.netproxy import TcpProxy
from fedline.testing.ledger import read_site_ledger, reconcile
from fedline.testing.procs import Launcher
from tests.conftest import eventually
from tests.plant.tier import (
    CENTRAL,
    aggregator_tables,
    broker_table,
    central_weights,
    checkpoints,
    federation_keys,
    line_toml,
    write_toml,
)

PLANTS = {"plant-a": ["a1", "a2", "a3"], "plant-b": ["b1", "b2", "b3"]}
LINES = {line: p for p, lines in PLANTS.items() for line in lines}


@pytest.mark.broker
async def test_two_plants_of_three_lines_stay_ledger_exact_across_a_cut_of_a_plant_to_central_link(tmp_path):
    t0 = time.monotonic()
    root = tmp_path
    federation_keys(root / "keys" / CENTRAL, CENTRAL, list(PLANTS))
    brokers = {CENTRAL: MosquittoProcess(root / "brokers" / CENTRAL, federation=CENTRAL, sites=list(PLANTS))}
    for p, lines in PLANTS.items():
        federation_keys(root / "keys" / p, p, lines)
        brokers[p] = MosquittoProcess(root / "brokers" / p, federation=p, sites=lines)
    launcher = Launcher(root / "logs")
    proxies: dict[str, TcpProxy] = {}
    agents: dict[str, EdgeAgent] = {}
    tasks: list[asyncio.Task] = []
    stop = asyncio.Event()
    central_state = root / "central" / "state"
    try:
        for b in brokers.values():
            await asyncio.to_thread(b.start)
        central = aggregator_tables(
            root / "central", CENTRAL, root / "keys" / CENTRAL, broker_table(brokers[CENTRAL], "aggregator"), k=1
        )
        write_toml(root / "central" / "aggregator.toml", central)
        procs = {
            CENTRAL: launcher.start(CENTRAL, ["aggregator", "--config", str(root / "central" / "aggregator.toml")])
        }
        for p in PLANTS:
            proxies[p] = await TcpProxy(brokers[CENTRAL].tls_port, name=p).start()
            kd = root / "keys" / p
            doc = aggregator_tables(root / "plants" / p, p, kd, broker_table(brokers[p], "aggregator"), k=3)
            doc["upstream"] = {
                "site": p,
                "federation": CENTRAL,
                "key_file": str(root / "keys" / CENTRAL / f"{p}.key"),
                "enrollment_file": str(root / "keys" / CENTRAL / "enrollment.json"),
                "data_dir": str(root / "plants" / p / "upstream"),
                "status_interval_s": 1.0,
                "broker": broker_table(
                    brokers[CENTRAL], p, f"mqtts://127.0.0.1:{proxies[p].port}", ca_file=brokers[CENTRAL].ca_file
                ),
                "outbox": {"resend_after_s": 5.0},
            }
            write_toml(root / "plants" / p / "plant.toml", doc)
            procs[p] = launcher.start(p, ["plant", "--config", str(root / "plants" / p / "plant.toml")])
        for i, (line, p) in enumerate(LINES.items()):
            path = line_toml(root / "lines" / line, line, p, root / "keys" / p, broker_table(brokers[p], line), seed=i)
            agents[line] = EdgeAgent(load_edge_config(path))
            tasks.append(asyncio.create_task(agents[line].run(stop)))

        def alive() -> None:
            for name, proc in procs.items():
                assert proc.alive(), f"{name} exited:\n{proc.tail()}"

        async def until(pred, timeout: float, what: str) -> None:
            try:
                await eventually(lambda: alive() or pred(), timeout, 0.1)
            except AssertionError:
                raise AssertionError(f"{what}: not within {timeout} s") from None

        def upstream(line: str) -> int | None:
            up = agents[line].base.manifest.get("upstream")
            return up["version"] if up else None

        def central_version() -> int:
            return max(checkpoints(central_state), default=-1)

        def follow(lines: list[str], version: int) -> bool:
            return all(upstream(line) == version for line in lines)

        def settled(lines: list[str]) -> bool:
            return all(agents[x].outbox.depth()[0] == 0 for x in lines) and all(
                e.state == "applied" for x in lines for e in agents[x].outbox.ledger()
            )

        async def round_(lines: list[str]) -> None:
            for line in lines:
                assert await agents[line].train_once() is not None, line

        # every line serves central version 0, received from its plant
        await until(lambda: all(a.sources_done for a in agents.values()) and follow(list(LINES), 0), 90, "start")

        # 1. all links up: one delta per plant, one central version per delta (K = 1)
        await round_(list(LINES))
        await until(lambda: settled(list(LINES)) and central_version() == 2, 60, "phase 1")
        await until(lambda: follow(list(LINES), 2), 30, "lines follow version 2")

        # 2. plant-a's uplink is cut: its lines are still answered by their plant; its delta waits
        proxies["plant-a"].cut()
        await round_(list(LINES))
        await until(lambda: settled(list(LINES)) and central_version() == 3, 60, "phase 2")
        await until(lambda: follow(PLANTS["plant-b"], 3), 30, "plant-b's lines follow version 3")
        plant_a_up = root / "plants" / "plant-a" / "upstream" / "outbox.sqlite"
        waiting = [e for e in read_site_ledger(plant_a_up) if e["state"] in ("queued", "sent")]
        assert len(waiting) == 1, read_site_ledger(plant_a_up)
        assert follow(PLANTS["plant-a"], 2), [upstream(x) for x in PLANTS["plant-a"]]

        # 3. the link is back: plant-a's delta goes out once; every line follows the newest version
        proxies["plant-a"].restore()
        await until(lambda: central_version() == 4 and follow(list(LINES), 4), 60, "phase 3")

        # both tiers reconcile
        for p, lines in PLANTS.items():
            rep = reconcile(
                {x: agents[x].outbox.path for x in lines}, root / "plants" / p / "state" / "aggregator.sqlite"
            )
            assert rep.exact, (p, rep.problems())
            assert (rep.sealed, rep.applied, rep.buffered) == (6, 6, 0), (p, rep.figures())
            reduces = [v for v, lin in checkpoints(root / "plants" / p / "state").items() if lin["updates"]]
            assert len(reduces) == 2, checkpoints(root / "plants" / p / "state")
        ups = {p: root / "plants" / p / "upstream" / "outbox.sqlite" for p in PLANTS}
        await until(
            lambda: all(e["state"] == "applied" for db in ups.values() for e in read_site_ledger(db)), 20, "receipts"
        )
        rep = reconcile(ups, central_state / "aggregator.sqlite")
        assert rep.exact, rep.problems()
        assert (rep.sealed, rep.applied, rep.versions) == (4, 4, 4), rep.figures()
        central_sites = {u["site"] for lin in checkpoints(central_state).values() for u in lin["updates"]}
        assert central_sites == set(PLANTS)  # the central aggregator never sees a line

        # each line holds central version 4's weights, and each plant delta reports its lines' largest ε
        w4 = central_weights(central_state, 4)
        for line, a in agents.items():
            for k, v in w4.items():
                np.testing.assert_array_equal(a.base.shared[k], v, err_msg=f"{line} {k}")
        for p, lines in PLANTS.items():
            first = read_site_ledger(ups[p])[0]
            eps_lines = [agents[x].outbox.ledger()[0].epsilon for x in lines]
            assert all(e is not None and e > 0 for e in eps_lines)
            with sqlite3.connect(f"file:{ups[p]}?mode=ro", uri=True) as con:
                (eps,) = con.execute("SELECT epsilon FROM ledger WHERE counter = ?", (first["counter"],)).fetchone()
            assert eps == pytest.approx(max(eps_lines)), (p, eps, eps_lines)
        print(f"plant tier scenario: {time.monotonic() - t0:.1f} s")
    finally:
        stop.set()
        _, slow = await asyncio.wait(tasks, timeout=30)  # bounded: a slow stop must not hang the suite
        for t in slow:
            t.cancel()
        for a in agents.values():
            a.close()
        await asyncio.to_thread(launcher.stop_all)
        for px in proxies.values():
            await px.stop()
        for b in brokers.values():
            await asyncio.to_thread(b.stop)
