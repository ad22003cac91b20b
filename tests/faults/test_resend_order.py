"""Updates the broker lost are resent after the site has sealed newer ones.

This is what follows any loss on the way: a broker killed before it saved its
queue, a 3.1.1 broker that acknowledges and drops, or an aggregator whose
session did not exist yet. Here the site starts before the aggregator ever
connected, so the broker drops what it publishes. The site resends what has no
receipt after ``resend_after_s``; meanwhile it seals newer updates. Each of
them is a genuine update that was never decided: each must be taken (or
stale-dropped) exactly once, whatever order they reach the aggregator in.

With the edge's default ``max_in_flight = 1`` updates leave strictly in
counter order, so the aggregator never sees a newer counter first. With more
in flight it can, and the aggregator then refuses the older ones as replays:
that variant is kept as an expected failure until the aggregator tells a
replay (a counter it has decided) from a late update (one it has not).
"""

from __future__ import annotations

import pytest

from fedline.testing.rig import FaultRig, RigSettings
from tests.faults.conftest import record


class RefusedAsReplay(AssertionError):
    """Genuine, never-decided updates were refused as replays (the expected failure below, and only it)."""


AGGREGATOR_REPLAY_RULE = (
    "aggregator/core.py AggregatorCore.decide refuses as 'replay' any counter below the site's highest decided "
    "counter that it never decided; with outbox.max_in_flight > 1 an update lost once on the way reaches it after "
    "a newer one and is refused: sealed, never applied, lost"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "in_flight",
    [1, pytest.param(3, marks=pytest.mark.xfail(strict=True, raises=RefusedAsReplay, reason=AGGREGATOR_REPLAY_RULE))],
)
async def test_updates_lost_once_then_resent_are_still_taken_once(tmp_path, in_flight: int) -> None:
    settings = RigSettings(
        rows_per_site=400,
        rate_hz=40.0,
        every_rows=40,
        buffer_size=2,
        max_staleness=20,
        resend_after_s=6.0,
        outbox={"max_in_flight": in_flight},
        # one site: one update per site per buffer (issue 14) never fills K = 2, so a partial buffer is reduced
        strategy={"buffer_timeout_s": 1.0},
    )
    async with FaultRig(tmp_path, ["site-a"], settings) as rig:
        rig.start_site("site-a")  # no aggregator session yet: the broker drops what the site publishes
        await rig.until(
            lambda: any(e["state"] == "sent" for e in rig.ledger("site-a")) and len(rig.ledger("site-a")) > in_flight,
            60,
            "updates published into the void, and newer ones sealed behind them",
        )
        published_blind = [e["counter"] for e in rig.ledger("site-a") if e["state"] == "sent"]
        rig.start_aggregator()
        await rig.until(rig.settled, 120, "every sealed update settled")
        rep = rig.reconcile()
        verdicts = {e["counter"]: (e["state"], e["reason"]) for e in rig.ledger("site-a")}
        refused = {c: v for c, v in verdicts.items() if v[0] == "rejected"}
        record(
            f"resend_after_loss_in_flight_{in_flight}",
            **rep.figures(),
            published_blind=published_blind,
            refused=refused,
            redeliveries_absorbed=rig.redeliveries(),
        )
        if refused:
            raise RefusedAsReplay(f"genuine updates refused: {refused}")
        assert rep.exact, rep.problems()
        assert all(verdicts[c][0] in ("applied", "buffered") for c in published_blind)
