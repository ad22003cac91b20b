"""kill -9 of the real aggregator process while a secure-aggregation cohort is open, over a real Mosquitto.

Four edge agents (real processes); site-d joins every cohort and never trains, so the first cohort
stays open with the masked updates of site-a, -b and -c held (``buffered``). The aggregator is killed
with SIGKILL, site-d leaves (its offline status), and the aggregator restarts from its SQLite store.
It must fail the dead cohort cleanly (a signed ``rejected`` / ``secagg_cohort_failed`` receipt to each
member that submitted), and the members must form a new cohort whose sum becomes version 1, with
nothing of the dead cohort applied and nothing applied twice.
"""

from __future__ import annotations

import sqlite3
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from fedline.testing.rig import FaultRig, RigSettings

SITES = ["site-a", "site-b", "site-c", "site-d"]
SUBMITTERS = ["site-a", "site-b", "site-c"]


def _edit(path: Path, change) -> None:
    doc = tomllib.loads(path.read_text())
    change(doc)
    path.write_text(tomli_w.dumps(doc))


def _verdicts(db: Path) -> list[tuple[str, int, str, str | None]]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT site, counter, verdict, reason FROM verdicts").fetchall()
    except sqlite3.OperationalError:
        return []


def _lineages(db: Path) -> dict[int, dict[str, Any]]:
    import json

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
        return {v: json.loads(t) for v, t in con.execute("SELECT version, lineage FROM checkpoints WHERE version > 0")}


@pytest.mark.broker
async def test_kill9_of_the_aggregator_with_a_cohort_open_fails_it_cleanly_and_the_next_cohort_applies(
    tmp_path,
) -> None:
    settings = RigSettings(
        federation="sakill",
        rows_per_site=120,
        rate_hz=400.0,
        training={"every_rows": 0, "every_s": 1.0, "on_new_model": True},
        strategy={"secure_aggregation": True, "min_sites": 3, "buffer_size": 3},
    )
    async with FaultRig(tmp_path, SITES, settings) as rig:
        agg_toml = tmp_path / "aggregator" / "aggregator.toml"
        _edit(agg_toml, lambda d: d.update(secagg={"gather_s": 60.0, "deadline_s": 300.0, "unmask_timeout_s": 30.0}))
        for s in SITES:
            _edit(rig.site_dir(s) / "site.toml", lambda d: d.update(secure_aggregation=True))
        _edit(rig.site_dir("site-d") / "site.toml", lambda d: d["training"].update(min_rows=10**6))
        rig.start_all()  # gather_s 60: the first cohort waits for all four sites to be online

        def held() -> list[str]:
            return sorted(s for s, _, v, _ in _verdicts(rig.aggregator_db) if v == "buffered")

        await rig.until(lambda: held() == SUBMITTERS, 90, "site-a, -b and -c's masked updates held in a cohort")
        agg = rig.procs.pop("aggregator")
        [announced] = agg.events("secagg.cohort_announced")
        dead = announced["cohort"]
        assert sorted(announced["members"]) == SITES
        agg.kill9()
        rig.procs.pop("site-d").terminate()  # leaves: its offline status is retained for the next aggregator

        # the restarted aggregator sees site-a, -b and -c online at once (retained statuses): no gathering
        _edit(agg_toml, lambda d: d["secagg"].update(gather_s=0.5))
        agg = rig.start_aggregator()
        await rig.until(lambda: bool(agg.since_start("secagg.cohorts_failed_on_restart")), 60, "the dead cohort failed")
        [failed] = agg.since_start("secagg.cohorts_failed_on_restart")
        assert failed["cohorts"] == [dead] and sorted(failed["rejected"]) == [f"{s}#1" for s in SUBMITTERS]

        def first_receipts() -> dict[str, tuple[str, str | None]]:
            return {s: (e["state"], e["reason"]) for s in SUBMITTERS for e in rig.ledger(s) if e["counter"] == 1}

        # each member that submitted holds the signed receipt saying its cohort failed
        await rig.until(
            lambda: first_receipts() == {s: ("rejected", "secagg_cohort_failed") for s in SUBMITTERS},
            60,
            "the failure receipts at site-a, -b and -c",
        )
        await rig.until(lambda: rig.version() >= 1, 90, "the next cohort's sum as version 1")

        lineage = _lineages(rig.aggregator_db)
        assert lineage[1]["strategy"] == "fedbuff-secagg" and lineage[1]["cohort"] != dead
        assert sorted((u["site"], u["counter"]) for u in lineage[1]["updates"]) == [(s, 2) for s in SUBMITTERS]
        assert all(lin["cohort"] != dead for lin in lineage.values())  # the dead cohort never became a version
        applied = [(u["site"], u["counter"]) for lin in lineage.values() for u in lin["updates"]]
        assert len(applied) == len(set(applied))  # nothing applied twice
        verdicts = {(s, c): (v, r) for s, c, v, r in _verdicts(rig.aggregator_db)}
        for s in SUBMITTERS:
            assert verdicts[(s, 1)] == ("rejected", "secagg_cohort_failed")
            assert verdicts[(s, 2)][0] == "applied"
        assert not any(s == "site-d" for s, _ in verdicts)  # it never sealed an update
