"""An update the broker lost is resent before anything newer leaves the site (regression test of the fix in
edge/sender.py, ``max_in_flight = 1``), and with the default throttle a site with no receipts seals one
update per base (issue 21's rule).

The loss is real: a site starts before the aggregator ever connected, so Mosquitto acknowledges and drops
what it publishes (as it does when it is killed before it saved its queue, or for a 3.1.1 broker). The
site resends what has no receipt after ``resend_after_s``.

Before the fix the edge sent every queued update at once: an update sealed after the aggregator came up
went straight in and was decided, and the older one lost on the way, resent later, was refused as a
replay (the aggregator refuses a never-decided counter below the highest it has decided: the replay rule,
tests/hostile/test_attacks_aggregator.py). With ``max_in_flight = 1`` nothing newer goes out before the
lost update's receipt; this test checks that order directly in the site's log, and that nothing is
refused. Run with ``max_in_flight`` raised (``site_outbox``), the order assertion and the no-refusal
assertion fail: that is the bug it guards.

Site ``ordered`` lifts the rig's throttle (``max_pending_per_base``), as the rig does by default, so that
newer updates are sealed on one base behind the lost one. With the default throttle of 1 that needs a
newer base, i.e. a version made from other sites while the update was lost; site ``throttled`` keeps the
default and shows what it does when nothing answers: one update sealed on base 0, rounds skipped with
reason ``pending_receipt`` (no privacy budget spent on updates that cannot help), the one update resent
and taken once the aggregator is there.
"""

from __future__ import annotations

from fedline.testing.rig import FaultRig, RigSettings
from tests.faults.conftest import record

ORDERED, THROTTLED = "site-a", "site-b"


def _first(events: list[dict], counter: int) -> float:
    return min(e["ts"] for e in events if e.get("counter") == counter)


async def test_an_update_lost_once_is_resent_before_anything_newer_and_nothing_is_refused(tmp_path) -> None:
    settings = RigSettings(
        rows_per_site=400,
        rate_hz=40.0,
        every_rows=40,
        buffer_size=2,
        max_staleness=20,
        resend_after_s=5.0,
        site_training={THROTTLED: {"max_pending_per_base": 1}},
        # one update per site per buffer (issue 14): a site's updates landing back to back supersede each
        # other; a partial buffer is reduced after 1 s, as the demo does (2 s)
        strategy={"buffer_timeout_s": 1.0},
    )
    async with FaultRig(tmp_path, [ORDERED, THROTTLED], settings) as rig:
        rig.start_site(ORDERED)  # no aggregator session yet: the broker drops what the sites publish
        rig.start_site(THROTTLED)
        a, b = rig.procs[ORDERED], rig.procs[THROTTLED]
        await rig.until(
            lambda: (
                any(e["state"] == "sent" for e in rig.ledger(ORDERED))
                and len(rig.ledger(ORDERED)) >= 2
                and len([e for e in b.events("round.skipped") if e.get("reason") == "pending_receipt"]) >= 1
            ),
            60,
            "an update published into the void with a newer one sealed behind it; the throttled site waiting",
        )
        blind = [e["counter"] for e in rig.ledger(ORDERED) if e["state"] == "sent"]
        assert blind == [1], blind  # one in flight: the newer ones wait in the outbox
        assert len(rig.ledger(THROTTLED)) == 1  # one update on base 0, then no more rounds on it
        agg = rig.start_aggregator()
        await rig.until(lambda: agg.events("aggregator.started"), 60, "the aggregator is up")
        started = agg.events("aggregator.started")[0]["ts"]
        await rig.until(rig.settled, 120, "every sealed update settled")
        rep = rig.reconcile()

        published = a.events("update.published")
        receipts = [e for e in a.events() if e["event"].startswith("receipt.")]
        sealed = {e["counter"]: e["ts"] for e in a.events("update.sealed")}
        counters = sorted(sealed)
        # strictly in order: no update went out for the first time before its predecessor's receipt came
        out_of_order = [c for c in counters[1:] if _first(published, c) < _first(receipts, c - 1)]
        # the ones an unordered sender would have sent straight into the running aggregator, ahead of update 1
        resent_1 = max(e["ts"] for e in published if e["counter"] == 1)
        overtakers = [c for c in counters[1:] if started <= sealed[c] < resent_1]
        refused = {
            f"{site}:{e['counter']}": e["reason"]
            for site in rig.sites
            for e in rig.ledger(site)
            if e["state"] == "rejected"
        }
        record(
            "resend_after_loss",
            **rep.figures(),
            published_blind=blind,
            attempts_of_1=len([e for e in published if e["counter"] == 1]),
            sealed_while_1_lost_after_aggregator_up=overtakers,
            throttled_rounds_skipped=len(b.events("round.skipped")),
            refused=refused,
        )
        assert len([e for e in published if e["counter"] == 1]) >= 2  # it was lost, and resent
        assert overtakers, "no newer update was sealed while update 1 was lost and the aggregator up: no test"
        assert not out_of_order, out_of_order
        assert not refused, refused
        assert rep.exact, rep.problems()
        assert rig.ledger(ORDERED)[0]["state"] in ("applied", "buffered", "stale"), rig.ledger(ORDERED)[0]
        first_b = rig.ledger(THROTTLED)[0]
        assert first_b["counter"] == 1 and first_b["base_version"] == 0 and first_b["state"] != "rejected", first_b
