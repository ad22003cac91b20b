"""Store and forward: every sealed update is on disk before any attempt to send it.

Why one SQLite file (WAL) for the outbox, the ledger, the counter and the
privacy accountant: queuing an update, bumping the per-site counter and
accounting its privacy cost must happen together or not at all, so that
``kill -9`` at any moment neither loses a sealed update nor reuses a counter
nor releases a step the accountant does not know about. One transaction does
all four.

Lifecycle of a row: ``queued`` → (all chunks acknowledged by the broker)
``sent`` → (the aggregator's signed receipt) deleted from the outbox, with the
verdict kept in the ledger. A broker's PUBACK is not enough to forget an
update (a 3.1.1 broker acknowledges what it drops), so a row that was sent but
got no receipt within ``resend_after_s`` is sent again. ``sent_at`` survives a
restart, so a restart alone does not send anything twice. The agent sends
rows strictly in order, at most ``max_in_flight`` (default 1) without a
receipt, so an update lost on the way is resent before any newer one goes out
(the aggregator refuses a counter below one it already decided).

A failed write (disk full) raises ``sqlite3.Error`` and leaves the database
as it was: SQLite rolls the transaction back.

The ledger records every update ever sealed (site, counter, msg_id, and its
fate: queued, sent, applied, buffered, stale, rejected, dropped) so a fault
test can reconcile it with the aggregator's receipts.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    counter INTEGER NOT NULL UNIQUE,
    msg_id TEXT NOT NULL UNIQUE,
    blob BLOB NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    sent_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS ledger (
    counter INTEGER PRIMARY KEY,
    site TEXT NOT NULL,
    msg_id TEXT NOT NULL UNIQUE,
    base_version INTEGER NOT NULL,
    n_samples INTEGER NOT NULL,
    epsilon REAL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    version INTEGER,
    settled_at REAL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def open_queue_db(path: str | Path, schema: str, synchronous: Literal["FULL", "NORMAL"] = "FULL") -> sqlite3.Connection:
    """An on-disk queue's SQLite file: WAL, explicit transactions (``BEGIN IMMEDIATE`` ... ``COMMIT``),
    usable from any thread under the caller's lock. ``FULL`` fsyncs every commit (a queued update must
    survive a power cut); ``NORMAL`` survives a crash of the process, not of the machine. Shared by the
    outbox and the line's prediction spool."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(p, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.executescript(schema)
    return db


Policy = Literal["drop_oldest", "stop_training"]  # drop_oldest drops paid-for updates: counted, logged, not the default


class OutboxFull(Exception):
    """The outbox is at its bound and the policy is ``stop_training``."""


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    counter: int
    msg_id: str
    blob: bytes
    size: int
    created_at: float
    sent_at: float | None
    attempts: int


@dataclass(frozen=True)
class LedgerEntry:
    counter: int
    site: str
    msg_id: str
    base_version: int
    n_samples: int
    epsilon: float | None
    size: int
    created_at: float
    state: str
    reason: str | None
    version: int | None


class Outbox:
    """The on-disk queue of sealed updates of one site, with its counter and meta values."""

    def __init__(self, path: str | Path, max_bytes: int, max_count: int, policy: Policy = "stop_training") -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.policy = policy
        self._lock = threading.Lock()
        self._db = open_queue_db(self.path, _SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- meta ----------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def set_meta_many(self, values: dict[str, str]) -> None:
        """Several meta values in one transaction (all or none: a recovery's counter, ledger and marker)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for k, v in values.items():
                    self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (k, v))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def last_counter(self) -> int:
        """The counter of the last update ever sealed (0 before the first)."""
        return int(self.get_meta("counter", "0") or 0)

    # -- bounds ----------------------------------------------------------------
    def depth(self) -> tuple[int, int]:
        """``(rows, bytes)`` waiting in the outbox."""
        with self._lock:
            n, b = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox").fetchone()
        return int(n), int(b)

    def is_full(self, incoming: int = 0) -> bool:
        """Whether one more update of ``incoming`` bytes would exceed a bound."""
        n, b = self.depth()
        return n + 1 > self.max_count or b + incoming > self.max_bytes

    # -- writing -----------------------------------------------------------------
    def put(
        self,
        *,
        site: str,
        counter: int,
        msg_id: str,
        base_version: int,
        n_samples: int,
        epsilon: float | None,
        blob: bytes,
        meta: dict[str, str] | None = None,
    ) -> list[LedgerEntry]:
        """Queue one sealed update, in one transaction with its counter and ``meta`` values.

        ``counter`` must be exactly the last counter + 1. When the outbox is
        full, ``drop_oldest`` drops the oldest rows (returned, and marked
        ``dropped`` in the ledger) and ``stop_training`` raises :class:`OutboxFull`.
        """
        now = time.time()
        size = len(blob)
        if size > self.max_bytes:
            raise OutboxFull(f"one update of {size} bytes is larger than the outbox bound {self.max_bytes}")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                last = self._db.execute("SELECT value FROM meta WHERE key = 'counter'").fetchone()
                last_counter = int(last[0]) if last else 0
                if counter != last_counter + 1:
                    raise ValueError(f"counter {counter} does not follow the last sealed counter {last_counter}")
                dropped = self._make_room(size, now)
                self._db.execute(
                    "INSERT INTO outbox (counter, msg_id, blob, size, created_at) VALUES (?, ?, ?, ?, ?)",
                    (counter, msg_id, blob, size, now),
                )
                self._db.execute(
                    "INSERT INTO ledger (counter, site, msg_id, base_version, n_samples, epsilon, size, created_at, state) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued')",
                    (counter, site, msg_id, base_version, n_samples, epsilon, size, now),
                )
                self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('counter', ?)", (str(counter),))
                for k, v in (meta or {}).items():
                    self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (k, v))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite already rolled back after e.g. SQLITE_FULL
                    self._db.execute("ROLLBACK")
                raise
        return dropped

    def _make_room(self, size: int, now: float) -> list[LedgerEntry]:
        """Inside ``put``'s transaction: room for ``size`` more bytes and one more row, by the policy.

        ``drop_oldest`` drops the oldest rows (marked ``dropped`` in the ledger, returned: their privacy cost
        was paid); ``stop_training`` raises :class:`OutboxFull` and the transaction rolls back.
        """
        dropped: list[LedgerEntry] = []
        while True:
            n, b = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox").fetchone()
            if n + 1 <= self.max_count and b + size <= self.max_bytes:
                return dropped
            if self.policy == "stop_training":
                raise OutboxFull(f"outbox holds {n} updates / {b} bytes (bounds {self.max_count} / {self.max_bytes})")
            seq, old_counter = self._db.execute("SELECT seq, counter FROM outbox ORDER BY seq LIMIT 1").fetchone()
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            self._db.execute(
                "UPDATE ledger SET state = 'dropped', reason = 'outbox full', settled_at = ? WHERE counter = ?",
                (now, old_counter),
            )
            dropped.append(self._ledger_row(old_counter))

    def rows(self) -> list[OutboxRow]:
        """Every row waiting for its receipt, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, counter, msg_id, blob, size, created_at, sent_at, attempts FROM outbox ORDER BY seq"
            ).fetchall()
        return [OutboxRow(*r) for r in rows]

    def pending(self, resend_after_s: float, now: float | None = None) -> list[OutboxRow]:
        """Rows to send now, oldest first: never sent, or sent without a receipt for too long."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, counter, msg_id, blob, size, created_at, sent_at, attempts FROM outbox "
                "WHERE sent_at IS NULL OR sent_at < ? ORDER BY seq",
                (now - resend_after_s,),
            ).fetchall()
        return [OutboxRow(*r) for r in rows]

    def mark_sent(self, msg_id: str) -> None:
        """Every chunk of ``msg_id`` was acknowledged by the broker."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "UPDATE outbox SET sent_at = ?, attempts = attempts + 1 WHERE msg_id = ?", (now, msg_id)
                )
                self._db.execute("UPDATE ledger SET state = 'sent' WHERE msg_id = ? AND state = 'queued'", (msg_id,))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def settle(self, counter: int, msg_id: str, verdict: str, reason: str | None, version: int | None) -> bool:
        """Apply the aggregator's signed verdict: the row leaves the outbox, the ledger keeps the verdict.

        Returns False when no such update is waiting (a duplicate receipt, or one for another update).
        A receipt with counter -1 is for an update refused before its header was read (bad signature,
        unknown key: what a key rotation or a revocation produces): it settles by ``msg_id`` alone, which
        the aggregator read from the topic, or the row would be resent forever (issue 14).
        """
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if counter < 0:
                    row = self._db.execute("SELECT counter FROM outbox WHERE msg_id = ?", (msg_id,)).fetchone()
                    if row is not None:
                        counter = int(row[0])
                cur = self._db.execute("DELETE FROM outbox WHERE counter = ? AND msg_id = ?", (counter, msg_id))
                found = cur.rowcount > 0
                if found:
                    self._db.execute(
                        "UPDATE ledger SET state = ?, reason = ?, version = ?, settled_at = ? "
                        "WHERE counter = ? AND msg_id = ?",
                        (verdict, reason, version, now, counter, msg_id),
                    )
                elif verdict != "buffered":
                    # FedBuff: 'buffered' cleared the outbox; the flush says where it went (applied), or a newer
                    # update of this site took its place in the buffer (stale, reason superseded)
                    self._db.execute(
                        "UPDATE ledger SET state = ?, reason = ?, version = ? WHERE counter = ? "
                        "AND msg_id = ? AND state = 'buffered'",
                        (verdict, reason, version, counter, msg_id),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite already rolled back after e.g. SQLITE_FULL
                    self._db.execute("ROLLBACK")
                raise
        return found

    # -- reading the ledger --------------------------------------------------------
    def unsettled_on_base(self, base_version: int) -> int:
        """Updates trained on ``base_version`` not yet decided for good: queued, sent, or buffered.

        The edge trains no further round on a base while this reaches
        ``training.max_pending_per_base``: an update that cannot be delivered
        yet would spend privacy budget on nothing, and one waiting in the
        aggregator's buffer would only be replaced by it (one update per site
        per buffer: the first becomes stale, "superseded"). Its flush receipt
        (applied or stale) or a new base version frees the site.
        """
        with self._lock:
            return int(
                self._db.execute(
                    "SELECT COUNT(*) FROM ledger WHERE base_version = ? AND state IN ('queued', 'sent', 'buffered')",
                    (base_version,),
                ).fetchone()[0]
            )

    def _ledger_row(self, counter: int) -> LedgerEntry:
        r = self._db.execute(
            "SELECT counter, site, msg_id, base_version, n_samples, epsilon, size, created_at, state, reason, version "
            "FROM ledger WHERE counter = ?",
            (counter,),
        ).fetchone()
        return LedgerEntry(*r)

    def ledger(self) -> list[LedgerEntry]:
        """Every update this site ever sealed, in counter order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT counter, site, msg_id, base_version, n_samples, epsilon, size, created_at, state, reason, version "
                "FROM ledger ORDER BY counter"
            ).fetchall()
        return [LedgerEntry(*r) for r in rows]


def read_ledger(path: str | Path) -> list[LedgerEntry]:
    """Every update a site ever sealed, read from its ``outbox.sqlite`` without opening it for writing.

    For reconciliation (fault tests, audits) with the aggregator's receipts,
    also while the agent runs (WAL lets a reader in beside the writer).
    """
    con = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True, timeout=10)
    try:
        rows = con.execute(
            "SELECT counter, site, msg_id, base_version, n_samples, epsilon, size, created_at, state, reason, version "
            "FROM ledger ORDER BY counter"
        ).fetchall()
    finally:
        con.close()
    return [LedgerEntry(*r) for r in rows]
