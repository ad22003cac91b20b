"""Clock skew: one site's wall clock 7 minutes ahead, another's 5 minutes behind, the aggregator's
2 minutes behind (each process started by :mod:`fedline.testing.clock`).

Nothing in fedline may depend on clocks agreeing across machines: staleness
is counted in model versions, replay protection in per-site counters, resends
by each process's own clock. Every update must be taken, none refused.
"""

from __future__ import annotations

import pytest

from fedline.testing.ledger import read_aggregator
from fedline.testing.rig import FaultRig, RigSettings
from tests.faults.conftest import record

SKEW = {"site-a": 420.0, "site-b": -300.0, "aggregator": -120.0}


@pytest.mark.slow
async def test_clock_skew_of_minutes_between_sites_and_aggregator_nothing_refused(tmp_path) -> None:
    settings = RigSettings(rows_per_site=280, rate_hz=60.0, every_rows=40, buffer_size=2, max_staleness=4)
    async with FaultRig(tmp_path, ["site-a", "site-b"], settings) as rig:
        rig.start_aggregator(clock_offset_s=SKEW["aggregator"])
        for site in ("site-a", "site-b"):
            rig.start_site(site, clock_offset_s=SKEW[site])
        await rig.until(rig.settled, 120, "every sealed update settled")
        rep = rig.reconcile()
        # the skew is real: the sites stamped their updates on their own clocks, the aggregator on its own
        verdicts, _, _ = read_aggregator(rig.aggregator_db)
        decided = {(v["site"], v["counter"]): v["decided_at"] for v in verdicts}
        import sqlite3

        offsets = {}
        for site in ("site-a", "site-b"):
            with sqlite3.connect(f"file:{rig.outbox_db(site)}?mode=ro", uri=True) as con:
                rows = con.execute("SELECT counter, created_at FROM ledger").fetchall()
            offsets[site] = round(min(created - decided[(site, c)] for c, created in rows), 0)
        record("clock_skew", **rep.figures(), skew_s=SKEW, sealed_minus_decided_s=offsets)
        assert rep.exact, rep.problems()
        # nothing refused, nothing too stale; a site's updates landing back to back may supersede each other in the
        # buffer (one update per site per buffer, issue 14): stale "superseded", whatever the clocks say
        assert rep.rejected == 0
        assert all(v["reason"] == "superseded" for v in verdicts if v["verdict"] == "stale"), verdicts
        assert abs(offsets["site-a"] - (SKEW["site-a"] - SKEW["aggregator"])) < 30
        assert abs(offsets["site-b"] - (SKEW["site-b"] - SKEW["aggregator"])) < 30
