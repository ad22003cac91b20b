"""The plant tier end to end: two plants x three lines over three Mosquittos (``tests/plant/tier.py``).

Real brokers, the real central aggregator and plant aggregators as processes
(``fedline aggregator``, ``fedline plant``), real edge agents as the lines.
Each line trains one round per phase (the test paces them), and the ledgers
then reconcile at both tiers: every line update applied exactly once at its
plant, every plant delta applied exactly once centrally, and each line holds
the central weights of the newest version, named in its plant's signed manifest.
"""

from __future__ import annotations

import sqlite3
import time

import numpy as np
import pytest

from fedline.testing.ledger import read_site_ledger
from tests.plant.tier import LINES, PLANTS, SECAGG_PLANTS, PlantTier, central_weights, checkpoints


@pytest.mark.broker
async def test_two_plants_of_three_lines_stay_ledger_exact_across_a_cut_of_a_plant_to_central_link(tmp_path):
    """1. all links up: both plants reduce, one delta each, two central versions;
    2. plant-a's link to the central broker is cut: its lines are still answered by their plant (its
       broker does not depend on the link), its delta waits in its outbox, plant-b's goes on;
    3. the link is back: plant-a's delta goes out once, central makes its version, every line follows it.
    plant-a runs secure aggregation over its three lines (it reads only their sum), plant-b plain FedBuff
    and sends its deltas upstream as int8."""
    t0 = time.monotonic()
    async with PlantTier(tmp_path) as tier:
        agents, everyone = tier.agents, list(LINES)
        # every line serves central version 0, received from its plant
        await tier.until(lambda: all(a.sources_done for a in agents.values()) and tier.follow(everyone, 0), 90, "start")

        await tier.round(everyone)
        await tier.until(lambda: tier.settled(everyone) and tier.central_version() == 2, 60, "phase 1")
        await tier.until(lambda: tier.follow(everyone, 2), 30, "lines follow version 2")

        tier.proxies["plant-a"].cut()
        await tier.round(everyone)
        await tier.until(lambda: tier.settled(everyone) and tier.central_version() == 3, 60, "phase 2")
        await tier.until(lambda: tier.follow(PLANTS["plant-b"], 3), 30, "plant-b's lines follow version 3")
        waiting = [e for e in read_site_ledger(tier.upstream_db("plant-a")) if e["state"] in ("queued", "sent")]
        assert len(waiting) == 1, read_site_ledger(tier.upstream_db("plant-a"))
        assert tier.follow(PLANTS["plant-a"], 2), [tier.upstream(x) for x in PLANTS["plant-a"]]
        # what plant-a's operator sees on its /metrics during the cut
        await tier.until(lambda: tier.plant_metrics("plant-a")["fedline_plant_upstream_connected"] == 0, 30, "cut seen")
        cut = tier.plant_metrics("plant-a")
        assert cut["fedline_plant_upstream_outbox_depth"] == 1 and cut["fedline_plant_central_version"] == 2, cut
        assert cut["fedline_plant_deltas_queued_total"] == 2 and cut["fedline_plant_upstream_outbox_bytes"] > 0, cut

        tier.proxies["plant-a"].restore()
        await tier.until(lambda: tier.central_version() == 4 and tier.follow(everyone, 4), 60, "phase 3")

        ups = [tier.upstream_db(p) for p in PLANTS]
        await tier.until(
            lambda: all(e["state"] == "applied" for db in ups for e in read_site_ledger(db)), 20, "receipts"
        )
        tier.check_ledgers(line_updates=6, plant_deltas=4)
        for p in PLANTS:
            m = tier.plant_metrics(p)
            assert m["fedline_plant_upstream_connected"] == 1 and m["fedline_plant_central_version"] == 4, (p, m)
            assert (
                m["fedline_plant_upstream_outbox_depth"] == 0
                and m['fedline_plant_receipts_total{verdict="applied"}'] == 2
            )
        for p in PLANTS:  # two reduces per plant, each sent up once; plant-a's are cohort sums
            reduces = [lin for lin in checkpoints(tier.plant_state(p)).values() if lin["updates"]]
            assert len(reduces) == 2 and len(read_site_ledger(tier.upstream_db(p))) == 2
            kind = "fedbuff-secagg" if p in SECAGG_PLANTS else "fedbuff"
            assert all(lin["strategy"] == kind and len(lin["updates"]) == 3 for lin in reduces), (p, reduces)

        # each line holds central version 4's weights, and each plant delta reports its lines' largest ε
        w4 = central_weights(tier.central_state, 4)
        for line, a in agents.items():
            for k, v in w4.items():
                np.testing.assert_array_equal(a.base.shared[k], v, err_msg=f"{line} {k}")
        for p, lines in PLANTS.items():
            eps_lines = [agents[x].outbox.ledger()[0].epsilon for x in lines]
            assert all(e is not None and e > 0 for e in eps_lines)
            with sqlite3.connect(f"file:{tier.upstream_db(p)}?mode=ro", uri=True) as con:
                (eps,) = con.execute("SELECT epsilon FROM ledger WHERE counter = 1").fetchone()
            assert eps == pytest.approx(max(eps_lines)), (p, eps, eps_lines)
        print(f"plant tier scenario: {time.monotonic() - t0:.1f} s")


#: three plants (a central cohort needs three members) of two lines each
COHORT_PLANTS = {"plant-a": ["a1", "a2"], "plant-b": ["b1", "b2"], "plant-c": ["c1", "c2"]}


@pytest.mark.broker
async def test_plants_masked_into_central_cohorts_stay_ledger_exact_and_central_reads_only_their_sum(tmp_path):
    """Secure aggregation at the central tier: each plant reduces its two lines (plain FedBuff), and its
    reduce waits until it can be masked into a central cohort of the three plants. Two cohorts, two central
    versions; every line update applied once at its plant, every plant delta applied once centrally, every
    central version a cohort sum of the three plants, and each line holds the newest central weights."""
    t0 = time.monotonic()
    tier = PlantTier(tmp_path, secagg_plants=set(), quantised_plants=set(), plants=COHORT_PLANTS, central_secagg=True)
    async with tier:
        agents, everyone = tier.agents, list(tier.lines)
        await tier.until(lambda: all(a.sources_done for a in agents.values()) and tier.follow(everyone, 0), 90, "start")
        for version in (1, 2):
            await tier.round(everyone)
            await tier.until(
                lambda v=version: tier.central_version() == v and tier.settled(everyone), 90, f"v{version}"
            )
            await tier.until(lambda v=version: tier.follow(everyone, v), 30, f"lines follow version {version}")
        ups = [tier.upstream_db(p) for p in COHORT_PLANTS]
        await tier.until(
            lambda: all(e["state"] == "applied" for db in ups for e in read_site_ledger(db)), 30, "receipts"
        )
        tier.check_ledgers(line_updates=4, plant_deltas=6)
        central = checkpoints(tier.central_state)
        for v in (1, 2):  # a cohort's sum: the central aggregator never held one plant's delta in the clear
            assert central[v]["strategy"] == "fedbuff-secagg", central[v]
            assert sorted(u["site"] for u in central[v]["updates"]) == sorted(COHORT_PLANTS), central[v]
        for p in COHORT_PLANTS:  # one reduce per cohort, each masked in once
            reduces = [lin for lin in checkpoints(tier.plant_state(p)).values() if lin["updates"]]
            assert len(reduces) == 2 and all(lin["strategy"] == "fedbuff" for lin in reduces), (p, reduces)
        w2 = central_weights(tier.central_state, 2)
        for line, a in agents.items():
            for k, v in w2.items():
                np.testing.assert_array_equal(a.base.shared[k], v, err_msg=f"{line} {k}")
        print(f"central cohorts of plants: {time.monotonic() - t0:.1f} s")


@pytest.mark.slow
@pytest.mark.broker
async def test_kill_9_of_a_plant_aggregator_mid_buffer_loses_and_doubles_nothing(tmp_path):
    """plant-a is killed (SIGKILL) with two of its three lines' updates buffered; the third line's update
    waits in the plant broker's session for it. Restarted, plant-a rebuilds its buffer from its store,
    reduces with the third, sends the delta up once; every line follows the new central version. Plain
    FedBuff at both plants: the buffer is what a kill -9 must not lose (a cohort fails and says so instead)."""
    async with PlantTier(tmp_path, secagg_plants=set()) as tier:
        agents, everyone = tier.agents, list(LINES)
        await tier.until(lambda: all(a.sources_done for a in agents.values()) and tier.follow(everyone, 0), 90, "start")
        await tier.round(PLANTS["plant-a"][:2])
        await tier.until(lambda: _buffered(tier.plant_state("plant-a")) == 2, 30, "two updates buffered")
        tier.kill_plant("plant-a")
        await tier.round([PLANTS["plant-a"][2], *PLANTS["plant-b"]])
        await tier.until(lambda: tier.central_version() == 1 and tier.follow(PLANTS["plant-b"], 1), 60, "plant-b")
        tier.start_plant("plant-a")
        await tier.until(lambda: tier.settled(everyone) and tier.central_version() == 2, 90, "plant-a restarted")
        await tier.until(lambda: tier.follow(everyone, 2), 60, "every line follows version 2")
        ups = [tier.upstream_db(p) for p in PLANTS]
        await tier.until(
            lambda: all(e["state"] == "applied" for db in ups for e in read_site_ledger(db)), 20, "receipts"
        )
        tier.check_ledgers(line_updates=3, plant_deltas=2)


def _buffered(state_dir) -> int:
    db = state_dir / "aggregator.sqlite"
    if not db.exists():
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
        return int(con.execute("SELECT COUNT(*) FROM buffer").fetchone()[0])
