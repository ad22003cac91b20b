"""A site loses its data directory (a new disk): it asks the aggregator, resumes, and is not wedged (issue 14).

Real processes: Mosquitto, ``fedline aggregator`` and ``fedline edge`` (FaultRig). The site publishes a few
updates, is stopped, its ``data_dir`` is deleted, and it starts again while the aggregator is down: it must
publish nothing (status ``recovering``). Once the aggregator is back it answers the signed request with a signed
answer sealed to the site; the site resumes its counter after the aggregator's (plus the outbox bound, so no
update of the lost disk still on its way can share a counter), reports an ε no lower than the aggregator read,
and its new updates are applied, none refused as a replay.
"""

from __future__ import annotations

import shutil

import pytest

from edge.outbox import read_ledger
from fedline.testing.rig import FaultRig, RigSettings
from tests.faults.conftest import record


def epsilons(rig: FaultRig, states: tuple[str, ...] = ()) -> list[float]:
    """ε after each update the site sealed (its own ledger), or only those in ``states``."""
    return [e.epsilon for e in read_ledger(rig.outbox_db("site-a")) if not states or e.state in states]


@pytest.mark.slow  # about 40 s: two aggregator starts, two site starts (the short variant: tests/edge)
async def test_lost_data_dir_resumes_counter_and_epsilon_from_the_aggregator(tmp_path) -> None:
    s = RigSettings(
        rows_per_site=200,
        rate_hz=40.0,
        every_rows=40,
        buffer_size=1,
        outbox={"max_count": 50},
        recovery={"ask_aggregator": True},
    )
    async with FaultRig(tmp_path, ["site-a"], s) as rig:
        rig.start_all()
        await rig.until(
            lambda: sum(e["state"] == "applied" for e in rig.ledger("site-a")) >= 2, 60, "two updates applied"
        )
        site = rig.procs["site-a"]
        before = [e for e in rig.ledger("site-a") if e["state"] == "applied"]
        # what the aggregator read (it applied them); an update sealed after them may never have left the
        # site before the disk was lost, and then it was never released: the aggregator cannot know of it
        top, eps_before = max(e["counter"] for e in before), max(epsilons(rig, ("applied",)))
        assert site.terminate() == 0
        assert rig.procs["aggregator"].terminate() == 0
        del rig.procs["aggregator"]
        shutil.rmtree(rig.site_dir("site-a") / "state")  # the disk is gone: dataset, outbox, ledger

        site = rig.start_site("site-a")  # from an empty state, with nobody to answer
        await rig.until(lambda: len(site.since_start("recovery.asked")) >= 2, 30, "the site asks (and asks again)")
        await rig.until(lambda: bool(site.since_start("sources.ended")), 30, "the site has its rows again")
        status = await rig.retained_status("site-a")
        assert status["publishing"] == "recovering", status
        assert rig.ledger("site-a") == []  # nothing sealed: counter and ε unknown
        assert [e for e in site.since_start("round.skipped") if e.get("reason") == "recovering"]

        agg = rig.start_aggregator()
        waited = await rig.until(lambda: bool(site.since_start("recovery.resumed")), 60, "the aggregator answers")
        resumed = site.since_start("recovery.resumed")[0]
        assert resumed["last_counter"] == top
        assert resumed["next_counter"] == top + 50 + 1  # after the lost outbox's bound (max_count)
        assert resumed["epsilon_floor"] >= eps_before - 1e-6 and eps_before > 0  # logs round to 6 decimals
        await rig.until(
            lambda: any(e["state"] == "applied" for e in rig.ledger("site-a")), 60, "a new update is applied"
        )
        after = rig.ledger("site-a")
        assert min(e["counter"] for e in after) == top + 51
        assert not [e for e in after if e["state"] == "rejected"], after  # no replay refusals: not wedged
        assert all(eps >= eps_before for eps in epsilons(rig))  # ε never restarts below what was spent
        status = await rig.retained_status("site-a")
        assert status["publishing"] == "ok" and status["epsilon"] >= eps_before - 1e-6, status
        assert agg.events("recovery.answered")
        record(
            "lost_data_dir",
            last_counter=top,
            resumed_at=top + 51,
            epsilon_before=round(eps_before, 4),
            epsilon_floor=round(resumed["epsilon_floor"], 4),
            answered_after_aggregator_start_s=round(waited, 2),
            new_updates_applied=sum(e["state"] == "applied" for e in after),
        )
