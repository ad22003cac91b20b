"""A site that starts from an empty data directory asks the aggregator before it publishes anything.

Why: the update counter and the privacy ledger live in ``<data_dir>/outbox.sqlite``.
When that file is new (a lost disk, a re-imaged gateway, or a first start), the
site cannot tell "never published" from "published for a year", so it asks
the aggregator (``broker_bridge.recovery``: a signed request, a signed answer
sealed to this site) and until the answer comes it trains nothing and sends
nothing (status ``publishing = "recovering"``). From the answer it:

- resumes its counter after the aggregator's last one plus a gap of
  ``outbox.max_count`` (the most updates the lost outbox could have held), so
  that no update of the lost disk still on its way (in the broker's queue)
  can share a counter with a new one: those arrive as replays and are refused,
  the new ones are taken;
- restores its reported ε as a floor: the per-record guarantee it reports
  never goes below the largest ε the aggregator read in its headers, and its
  release count (``max_releases``) and its one-accountant figure
  (``epsilon_global_history``) carry the releases the aggregator read.

What it cannot restore: which *rows* were in those releases (the rows were on
the lost disk too). Rows stored after recovery start their own ledgers. If the
plant re-feeds records the site already trained on (replaying a historian), the
new per-record figures do not cover those records' earlier rounds; the floor
and the global figure above are the honest summary then (docs/architecture.md).

The answer is written in one outbox transaction with a ``recovery`` marker, so
a restart after it does not ask again, and a crash before it asks again.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from broker_bridge.errors import WireError
from broker_bridge.keys import Enrollment, KeyPair
from broker_bridge.recovery import RecoveryAnswer, new_nonce, open_answer, seal_request
from edge.config import PrivacyConfig
from edge.ledger_privacy import STATE_VERSION, RecordLedger, group_cost
from edge.outbox import Outbox
from fedline.logs import event

log = logging.getLogger("fedline.edge")

MARKER = "recovery"  # outbox meta key: the answer this data directory resumed from


def needs_recovery(outbox: Outbox) -> bool:
    """An empty state: no update ever sealed here and no recovery done (a new or a lost data directory)."""
    return outbox.get_meta("counter") is None and outbox.get_meta(MARKER) is None


def restored_ledger_state(cfg: PrivacyConfig, group: int, answer: RecoveryAnswer) -> str:
    """A per-record ledger with no live rounds, whose guarantee and release count start at the aggregator's.

    ``total_rdp`` (the one-accountant comparison) composes every release the aggregator read.
    """
    led = RecordLedger(cfg, group)
    total = np.zeros(len(led.orders))
    for q, sigma, steps, g, count in answer.history:
        qu, su = group_cost(q, sigma, g)
        total = total + led._unit(qu, su) * steps * count
    return json.dumps(
        {
            "version": STATE_VERSION,
            "group": led.group,
            "next_index": answer.releases,
            "rounds": [],
            "retired_below": 1,
            "retired": 0,
            "max_epsilon": answer.epsilon,
            "releases": answer.releases,
            "total_rdp": [float(v) for v in total],
        }
    )


class Recovery:
    """One site's pending recovery: the request to (re)send, and the answer that ends it."""

    def __init__(self, keys: KeyPair, enrollment: Enrollment, federation: str, gap: int) -> None:
        self.keys = keys
        self.enrollment = enrollment
        self.federation = federation
        self.gap = gap
        self.nonce = new_nonce()  # one per attempt: an answer to any earlier request is refused
        self.done = False
        self.asked = 0
        self.started_at = time.monotonic()

    def request(self) -> bytes:
        self.asked += 1
        return seal_request(self.federation, self.nonce, self.keys, self.enrollment.aggregator.box_pub)

    def open(self, payload: bytes) -> RecoveryAnswer:
        """The checked answer (:class:`WireError` naming what is wrong: not ours, forged, an old nonce)."""
        return open_answer(payload, self.keys, self.enrollment.aggregator.sign_pub, self.federation, self.nonce)

    def apply(self, answer: RecoveryAnswer, outbox: Outbox, dp: PrivacyConfig | None, group: int) -> int:
        """Write the resumed counter, ledger and marker in one transaction; returns the next counter's base."""
        counter = answer.last_counter + self.gap if answer.last_counter > 0 else 0
        meta = {
            "counter": str(counter),
            MARKER: json.dumps(
                {
                    "at": time.time(),
                    "last_counter": answer.last_counter,
                    "resumed_after": counter,
                    "epsilon": answer.epsilon,
                    "releases": answer.releases,
                }
            ),
        }
        if dp is not None:
            meta["record_ledger"] = restored_ledger_state(dp, group, answer)
        outbox.set_meta_many(meta)
        self.done = True
        event(
            log,
            "recovery.resumed",
            site=self.keys.ident,
            last_counter=answer.last_counter,
            next_counter=counter + 1,
            epsilon_floor=round(answer.epsilon, 6),
            releases=answer.releases,
            waited_s=round(time.monotonic() - self.started_at, 3),
        )
        return counter


__all__ = ["MARKER", "Recovery", "WireError", "needs_recovery", "restored_ledger_state"]
