"""The broker is killed (SIGKILL) in the middle of training and restarted with its persistence file.

Everything in flight when it dies is at risk: chunks the broker acknowledged
but had not yet forwarded, receipts it had not yet delivered, and up to
``autosave_interval`` seconds of queued messages it had not saved. The sites'
outboxes resend what got no receipt; the aggregator answers a resent update
from its store. The ledger must come out exact.
"""

from __future__ import annotations

import asyncio
import time

from fedline.testing.rig import FaultRig, RigSettings
from tests.faults.conftest import record

SITES = ["site-a", "site-b"]


async def test_broker_kill9_mid_training_then_restart_ledger_exact(tmp_path) -> None:
    # 12 s of rows: under load the first decisions can take longer than 6 s, and with every row already in
    # before the kill nothing would be left to train on (and decide) once the broker is back
    settings = RigSettings(rows_per_site=480, rate_hz=40.0, every_rows=40, buffer_size=3, max_staleness=6)
    async with FaultRig(tmp_path, SITES, settings) as rig:
        rig.start_all()
        await rig.until(lambda: rig.decided() >= 3, 90, "three updates decided before the fault")
        sealed_before = rig.sealed()
        await asyncio.to_thread(rig.broker.kill)
        killed_at = time.time()
        await asyncio.sleep(3.0)  # training goes on; the outboxes fill
        await asyncio.to_thread(rig.broker.start)
        back_at = time.time()
        await rig.until(
            lambda: rig.decided() > 0 and _first_decision_after(rig, back_at) is not None,
            60,
            "a decision after the broker came back",
        )
        recovery_s = _first_decision_after(rig, back_at) - back_at
        await rig.until(rig.settled, 120, "every sealed update settled")
        rep = rig.reconcile()
        record(
            "broker_kill9_restart",
            **rep.figures(),
            sealed_before_kill=sealed_before,
            broker_down_s=round(back_at - killed_at, 1),
            recovery_s=round(recovery_s, 2),
            redeliveries_absorbed=rig.redeliveries(),
        )
        assert rep.exact, rep.problems()
        assert rep.rejected == 0 and rep.dropped_by_policy == 0
        assert rep.sealed > sealed_before  # training went on across the outage


def _first_decision_after(rig: FaultRig, t: float) -> float | None:
    import sqlite3

    with sqlite3.connect(f"file:{rig.aggregator_db}?mode=ro", uri=True, timeout=5) as con:
        row = con.execute("SELECT MIN(decided_at) FROM verdicts WHERE decided_at > ?", (t,)).fetchone()
    return row[0]
