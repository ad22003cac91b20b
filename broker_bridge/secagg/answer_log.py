"""A member's durable memory of each cohort, in SQLite on disk (synchronous=FULL).

Why durable: the protocol's privacy rests on a member never revealing, in one cohort, both the
self-mask share of a site j (j survived) and its shares of pair seeds with j (j dropped). A
malicious aggregator could otherwise declare j dropped, collect the pair seeds, restart the
member (or wait for a crash) and then ask again with j a survivor. So before anything leaves,
the member records: which cohort announcement it joined (a replay is refused), that it masked
once (never twice with the same pair seeds), which survivors announcement it acknowledged (one
per cohort), and the role (survivor or dropped) it answered for each site.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from broker_bridge.errors import SecAggError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cohorts (
    cohort TEXT PRIMARY KEY, cohort_hash BLOB NOT NULL, announcement BLOB NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('joined', 'submitted')), joined_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS acks (cohort TEXT PRIMARY KEY, survivors_hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS roles (
    cohort TEXT NOT NULL, site TEXT NOT NULL, role TEXT NOT NULL CHECK (role IN ('survivor', 'dropped')),
    PRIMARY KEY (cohort, site));
"""


class AnswerLog:
    """One SQLite file per member; every method is one transaction, committed before it returns."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _tx(self) -> sqlite3.Cursor:
        return self._db.execute("BEGIN IMMEDIATE")

    def join(self, cohort: str, cohort_hash: bytes, announcement: bytes) -> None:
        """Remember a cohort announcement; refuse one whose cohort id was seen before."""
        try:
            self._tx()
            if self._db.execute("SELECT 1 FROM cohorts WHERE cohort = ?", (cohort,)).fetchone():
                raise SecAggError("replay", f"cohort {cohort} was announced before")
            self._db.execute(
                "INSERT INTO cohorts VALUES (?, ?, ?, 'joined', ?)", (cohort, cohort_hash, announcement, time.time())
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def announcement(self, cohort: str) -> tuple[bytes, bytes, str] | None:
        """(announcement blob, cohort hash, state) of a joined cohort, or None."""
        row = self._db.execute(
            "SELECT announcement, cohort_hash, state FROM cohorts WHERE cohort = ?", (cohort,)
        ).fetchone()
        return None if row is None else (bytes(row[0]), bytes(row[1]), row[2])

    def mark_submitted(self, cohort: str) -> None:
        """Record, before masking, that this member masks once in ``cohort``."""
        cur = self._db.execute(
            "UPDATE cohorts SET state = 'submitted' WHERE cohort = ? AND state = 'joined'", (cohort,)
        )
        if cur.rowcount != 1:
            raise SecAggError("state", f"cohort {cohort} is unknown or this member already masked in it")

    def pin_ack(self, cohort: str, survivors_hash: bytes) -> None:
        """Acknowledge one survivors announcement per cohort; another one is equivocation."""
        try:
            self._tx()
            row = self._db.execute("SELECT survivors_hash FROM acks WHERE cohort = ?", (cohort,)).fetchone()
            if row is None:
                self._db.execute("INSERT INTO acks VALUES (?, ?)", (cohort, survivors_hash))
            elif bytes(row[0]) != survivors_hash:
                raise SecAggError(
                    "equivocation", f"this member acknowledged another survivors announcement for cohort {cohort}"
                )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def record_roles(self, cohort: str, roles: dict[str, str]) -> None:
        """Record the role each site is answered for, all or nothing; refuse any change of role."""
        try:
            self._tx()
            known = dict(self._db.execute("SELECT site, role FROM roles WHERE cohort = ?", (cohort,)).fetchall())
            changed = sorted(s for s, r in roles.items() if s in known and known[s] != r)
            if changed:
                raise SecAggError(
                    "equivocation", f"cohort {cohort}: already answered {', '.join(changed)} in the other role"
                )
            self._db.executemany(
                "INSERT OR IGNORE INTO roles VALUES (?, ?, ?)", [(cohort, s, r) for s, r in sorted(roles.items())]
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def roles(self, cohort: str) -> dict[str, str]:
        return dict(self._db.execute("SELECT site, role FROM roles WHERE cohort = ?", (cohort,)).fetchall())
