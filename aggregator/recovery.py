"""What the aggregator accepted from each site, kept so a site that lost its data directory can resume.

Why here: a site's counter and ε live on the site's disk; when that disk is
lost, the aggregator's store is the only other place that knows them. Every
update whose header the aggregator read is noted in the transaction that
writes its verdict (so this history is never behind the verdicts, and kill -9
leaves both or neither): its
counter, the per-record ε its header claims and its DP parameters
``(sample_rate, noise_multiplier, steps, unit_group)``, counted per distinct
parameter set (a site's parameters rarely change, so the history stays a few
rows however long it runs).

A recovery request (``broker_bridge.recovery``) is answered with the highest
counter (this history's or the verdicts', whichever is higher), the largest ε
claimed, the number of releases and the parameter history, signed and sealed
to the site. Requests are answered at most once per ``min_interval_s`` per site.

The ε a header claims is the site's own figure: an honest site that lost its
disk gets back what it said; a site that lied about ε lied to itself. The
history lets the site rebuild what one accountant over all its releases says.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from aggregator.store import Store
from broker_bridge.envelope import UpdateHeader
from broker_bridge.errors import WireError
from broker_bridge.keys import Enrollment, KeyPair
from broker_bridge.recovery import RecoveryAnswer, open_request, seal_answer
from fedline.logs import event

log = logging.getLogger("fedline.aggregator")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS site_history (
    site TEXT PRIMARY KEY, last_counter INTEGER NOT NULL, epsilon REAL NOT NULL, releases INTEGER NOT NULL,
    updated_at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS site_releases (
    site TEXT NOT NULL, sample_rate REAL NOT NULL, sigma REAL NOT NULL, steps INTEGER NOT NULL,
    unit_group INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (site, sample_rate, sigma, steps, unit_group)) WITHOUT ROWID;
"""


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _dp_params(privacy: dict[str, object]) -> tuple[float, float, int, int] | None:
    """``(q, σ, steps, group)`` of a DP-SGD header, or None (privacy off, or fields missing or out of range)."""
    if privacy.get("mode") != "dp-sgd":
        return None
    q, sigma, steps, group = (_num(privacy.get(k)) for k in ("sample_rate", "noise_multiplier", "steps", "unit_group"))
    if q is None or sigma is None or steps is None or not 0 < q <= 1 or sigma <= 0 or steps < 0:
        return None
    return q, sigma, int(steps), max(1, int(group or 1))


class SiteHistory:
    """Per site: the highest counter read, the largest ε claimed, and its DP releases (in the aggregator's SQLite).

    Its rows live in the store's database and are written through the store's connection: a decision's note
    goes in the decision's own transaction (:meth:`note_with_decision`), so the history and the verdicts
    commit together, one transaction per decision instead of two on two connections.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        store.ensure_schema(_SCHEMA)
        self.reload()

    def reload(self) -> None:
        """Each site's highest noted counter as committed (at start, and after a failed group commit)."""
        self._top = {site: c for site, c in self.store.rows("SELECT site, last_counter FROM site_history")}

    def _statements(self, h: UpdateHeader) -> list[tuple[str, tuple[Any, ...]]]:
        """The upserts that note ``h`` (none for a counter already noted: a resend or a replay)."""
        if h.counter <= self._top.get(h.site, 0):
            return []
        eps = _num(h.privacy.get("epsilon")) or 0.0
        dp = _dp_params(h.privacy)
        out: list[tuple[str, tuple[Any, ...]]] = [
            (
                "INSERT INTO site_history (site, last_counter, epsilon, releases, updated_at) VALUES (?, ?, ?, 1, ?) "
                "ON CONFLICT(site) DO UPDATE SET last_counter = excluded.last_counter, "
                "epsilon = MAX(epsilon, excluded.epsilon), releases = releases + 1, updated_at = excluded.updated_at",
                (h.site, h.counter, eps, time.time()),
            )
        ]
        if dp is not None:
            out.append(
                (
                    "INSERT INTO site_releases (site, sample_rate, sigma, steps, unit_group, count) "
                    "VALUES (?, ?, ?, ?, ?, 1) ON CONFLICT(site, sample_rate, sigma, steps, unit_group) "
                    "DO UPDATE SET count = count + 1",
                    (h.site, *dp),
                )
            )
        self._top[h.site] = h.counter
        return out

    def note(self, h: UpdateHeader) -> None:
        """Remember an update whose header was read, now, in a transaction of its own. Idempotent per counter."""
        stmts = self._statements(h)
        if stmts:
            self.store.transaction(stmts)

    def note_with_decision(self, h: UpdateHeader) -> None:
        """Remember ``h`` in the transaction of the decision about it (the store's next one). Idempotent.

        The history is then never behind the verdicts, as when it was written first in a transaction of
        its own, and one transaction is saved per decision. A note whose transaction fails stays pending
        and goes with the next one that commits (:meth:`aggregator.store.Store.with_next_transaction`).
        """
        self.store.with_next_transaction(self._statements(h))

    def answer(self, site: str, nonce: str, decided_top: int | None) -> RecoveryAnswer:
        """What to tell ``site``: ``decided_top`` is the store's highest decided counter for it."""
        rows = self.store.rows("SELECT last_counter, epsilon, releases FROM site_history WHERE site = ?", (site,))
        hist = self.store.rows(
            "SELECT sample_rate, sigma, steps, unit_group, count FROM site_releases WHERE site = ? "
            "ORDER BY sample_rate, sigma, steps, unit_group",
            (site,),
        )
        last, eps, releases = rows[0] if rows else (0, 0.0, 0)
        return RecoveryAnswer(
            site=site,
            nonce=nonce,
            last_counter=max(int(last), int(decided_top or 0)),
            epsilon=float(eps),
            releases=int(releases),
            history=[(float(q), float(s), int(n), int(g), int(c)) for q, s, n, g, c in hist],
        )


class RecoveryDesk:
    """Answers recovery requests: open and check, read the history, sign and seal to the site."""

    def __init__(self, history: SiteHistory, keys: KeyPair, min_interval_s: float = 1.0) -> None:
        self.history = history
        self.keys = keys
        self.min_interval_s = min_interval_s
        self._last: dict[str, float] = {}

    def handle(self, site: str, payload: bytes, enrollment: Enrollment, decided_top: int | None) -> bytes | None:
        """The sealed answer for a request on ``site``'s topic, or None when rate-limited (logged).

        ``enrollment`` is the core's current one (it is reloaded when the file changes).

        Raises :class:`WireError` for a request that does not check out (the caller counts it).
        """
        nonce = open_request(payload, site, self.keys, enrollment)
        now = time.monotonic()
        if now - self._last.get(site, -math.inf) < self.min_interval_s:
            event(log, "recovery.rate_limited", level=logging.WARNING, site=site)
            return None
        self._last[site] = now
        answer = self.history.answer(site, nonce, decided_top)
        event(
            log,
            "recovery.answered",
            site=site,
            last_counter=answer.last_counter,
            releases=answer.releases,
            epsilon=round(answer.epsilon, 6),
        )
        return seal_answer(answer, enrollment.federation, self.keys, enrollment.sites[site].box_pub)


__all__ = ["RecoveryDesk", "SiteHistory", "WireError"]
