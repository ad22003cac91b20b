"""The outbox runs out of room: by its configured cap, and for real (a full file system).

Cap (``[outbox] max_count``): the aggregator is away (stopped after it made
its persistent session, so the broker keeps what is sent to it), receipts do
not come and the outboxes fill. ``drop_oldest`` drops the oldest update (its
ledger row says ``dropped``, and it logs ``outbox.dropped``), ``stop_training``
stops releasing updates and says ``publishing.outbox_full``; when the
aggregator comes and receipts free the outbox, training and sending resume.

Full disk: the site's ``data_dir`` is an 8 MiB tmpfs; a ballast file fills it
while the agent runs, and is deleted later. The agent must keep running, say
so (``dataset.write_failed`` for rows it cannot store, ``update.not_queued``
for a round it cannot queue: nothing released, nothing accounted), and carry on
once there is room again.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from fedline.testing.ledger import read_aggregator
from fedline.testing.patience import bound
from fedline.testing.rig import FaultRig, RigSettings
from tests.faults.conftest import record


@pytest.mark.slow
async def test_outbox_cap_drop_oldest_and_stop_training_then_recover(tmp_path) -> None:
    settings = RigSettings(
        rows_per_site=520,
        rate_hz=40.0,
        every_rows=40,
        buffer_size=2,
        max_staleness=20,
        training={"every_s": 2.0},  # a skipped round is retried on time, too
        site_outbox={
            "site-a": {"max_count": 3, "policy": "drop_oldest"},
            "site-b": {"max_count": 3, "policy": "stop_training"},
        },
        recovery={"ask_aggregator": False},  # the sites start while the aggregator is away: nobody would answer
    )
    async with FaultRig(tmp_path, ["site-a", "site-b"], settings) as rig:
        agg = rig.start_aggregator()
        await rig.until(lambda: agg.events("aggregator.started"), 60, "the aggregator's session exists")
        assert agg.terminate() == 0
        del rig.procs["aggregator"]
        rig.start_site("site-a")
        rig.start_site("site-b")
        a, b = rig.procs["site-a"], rig.procs["site-b"]
        await rig.until(
            lambda: (
                len(a.events("outbox.dropped")) >= 2
                and len(b.events("publishing.outbox_full")) >= 1
                and len([e for e in b.events("round.skipped") if e.get("reason") == "outbox_full"]) >= 2
            ),
            60,
            "both outboxes full and the policies applied",
        )
        assert rig.unsettled("site-a") == 3 and rig.unsettled("site-b") == 3  # never above the cap
        status_b = await rig.retained_status("site-b")  # what an operator (fedline status) sees
        assert status_b["publishing"] == "outbox_full" and status_b["outbox_depth"] == 3, status_b
        full_at = time.time()
        rig.start_aggregator()  # receipts come: room again
        await rig.until(lambda: len(b.since_start("publishing.ok")) >= 1, 60, "stop_training site publishes again")
        resumed_s = time.time() - full_at
        await rig.until(rig.settled, 120, "every sealed update settled")
        rep = rig.reconcile()
        dropped_a = [e for e in rig.ledger("site-a") if e["state"] == "dropped"]
        skipped_b = len([e for e in b.events("round.skipped") if e.get("reason") == "outbox_full"])
        record(
            "outbox_cap",
            **rep.figures(),
            site_a_dropped=len(dropped_a),
            site_b_rounds_skipped=skipped_b,
            resumed_after_s=round(resumed_s, 1),
        )
        assert rep.exact, rep.problems()
        # what each outbox held through the outage reaches the aggregator back to back: one update per site per
        # buffer (issue 14), so a newer one takes its older one's place (stale, 'superseded'); nothing else is refused
        verdicts = read_aggregator(rig.aggregator_db)[0]
        stale_reasons = Counter(v["reason"] for v in verdicts if v["verdict"] == "stale")
        assert rep.rejected == 0 and set(stale_reasons) <= {"superseded"}, stale_reasons
        assert rep.dropped_by_policy + rep.dropped_after_send == len(dropped_a) >= 2
        assert all(e["reason"] == "outbox full" for e in dropped_a)
        assert not [e for e in rig.ledger("site-b") if e["state"] == "dropped"]  # stop_training drops nothing
        assert len(rig.ledger("site-b")) > 3  # and it trained again after the outbox emptied


@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs (needs root or CAP_SYS_ADMIN: the fault suite runs as root in CI and here)."""
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-full test (needs root): {out.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(path: Path) -> int:
    """Write zeros into ``path`` until the file system is full; returns the bytes written."""
    written = 0
    block = b"\0" * 65536
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                written += fh.write(block)
        except OSError:
            pass
    return written


async def test_full_file_system_under_data_dir_agent_survives_and_recovers(tmp_path, small_fs) -> None:
    """A regression test (the agent used to exit on the first failed write: "cannot rollback - no transaction
    is active"), short enough for the default run: one settled update, the disk full until the agent has
    said so, then room again and one more update. The replay (12 s of rows at the default patience) runs
    through all three phases: rows are written, and refused, while the disk is full."""
    rows = int(bound(160))  # 480 rows, 12 s at 40 Hz: scaled with the patience, so a slow machine still has rows
    settings = RigSettings(
        rows_per_site=rows, rate_hz=40.0, every_rows=40, buffer_size=1, max_staleness=20, training={"every_s": 1.0}
    )
    async with FaultRig(tmp_path / "rig", ["site-a"], settings) as rig:
        state = rig.site_dir("site-a") / "state"
        os.symlink(small_fs, state)  # the site's data_dir (dataset, outbox, ledger) lives on the small fs
        rig.start_all()
        a = rig.procs["site-a"]
        await rig.until(
            lambda: len(rig.ledger("site-a")) >= 1 and rig.unsettled("site-a") == 0,
            60,
            "an update settled before the disk fills",
        )
        assert not a.since_start("sources.ended"), "the replay ended before the disk filled: nothing was refused"
        ballast = small_fs / "ballast"
        filled = await asyncio.to_thread(_fill, ballast)
        sealed_full = len(rig.ledger("site-a"))

        def said() -> list[dict]:
            return [e for e in a.events() if e["event"] in ("dataset.write_failed", "update.not_queued")]

        await rig.until(lambda: len(said()) >= 3, 20, "the agent says its disk is full")
        await asyncio.sleep(1.0)  # rows keep coming and a timer round comes due (every_s 1) on the full disk
        rig.check_alive()
        failed = said()
        assert all("full" in e["error"] for e in failed), failed
        ballast.unlink()
        freed_at = time.time()
        await rig.until(lambda: len(rig.ledger("site-a")) > sealed_full, 30, "a new update after the disk has room")
        await rig.until(rig.settled, 60, "every sealed update settled")
        rep = rig.reconcile()
        record(
            "disk_full_tmpfs",
            **rep.figures(),
            ballast_bytes=filled,
            sealed_before_full=sealed_full,
            said={n: sum(1 for e in failed if e["event"] == n) for n in ("dataset.write_failed", "update.not_queued")},
            recovered_s=round(time.time() - freed_at, 1),
        )
        assert rep.exact, rep.problems()
