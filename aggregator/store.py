"""The aggregator's durable state: one SQLite database in WAL mode.

Why SQLite: one file, atomic multi-row transactions, and crash safety that
does not depend on us getting fsync ordering right. Every decision is one
transaction, and the in-memory model is swapped only after it commits:

- a rejected or stale update: its verdict row;
- a buffered update (FedBuff): the sealed update itself and its verdict, so
  a restart rebuilds the same buffer;
- a reduce: the new checkpoint (weights, server momentum, lineage), the
  verdicts of every update in it set to ``applied`` with the version, and the
  buffer emptied.

So the log of accepted updates is written no later than the model that
contains them, and kill -9 at any point leaves either the old version and
buffer or the new ones, never a mix: no update is lost or counted twice.
Verdicts are kept by ``(site, counter)`` so a resent duplicate (its receipt
was lost) gets its original verdict again. ``synchronous=NORMAL`` survives a
killed process; ``fsync = true`` (FULL) also survives a power cut.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS verdicts (
    site TEXT NOT NULL, counter INTEGER NOT NULL, msg_id TEXT NOT NULL,
    verdict TEXT NOT NULL, reason TEXT, detail TEXT, version INTEGER,
    staleness INTEGER, weight REAL, decided_at REAL NOT NULL,
    PRIMARY KEY (site, counter)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS buffer (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, site TEXT NOT NULL, counter INTEGER NOT NULL,
    msg_id TEXT NOT NULL, base_version INTEGER NOT NULL, n_samples INTEGER NOT NULL,
    staleness INTEGER NOT NULL, factor REAL NOT NULL, weight REAL NOT NULL, sealed BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    version INTEGER PRIMARY KEY, created_at REAL NOT NULL, weights BLOB, momentum BLOB,
    lineage TEXT NOT NULL, metric REAL);
CREATE TABLE IF NOT EXISTS published (
    version INTEGER PRIMARY KEY, weights_chunks INTEGER NOT NULL, onnx_chunks INTEGER NOT NULL,
    published_at REAL NOT NULL, cleared INTEGER NOT NULL DEFAULT 0);
"""


@dataclass(frozen=True)
class Verdict:
    site: str
    counter: int
    msg_id: str
    verdict: str  # applied | buffered | stale | rejected
    reason: str | None
    detail: str | None
    version: int | None
    staleness: int | None = None
    weight: float | None = None

    def receipt(self) -> dict[str, Any]:
        """The signed receipt's fields (DESIGN.md), plus detail, staleness and weight for people."""
        return {"site": self.site, "counter": self.counter, "msg_id": self.msg_id, "verdict": self.verdict,
                "reason": self.reason, "version": self.version, "detail": self.detail,
                "staleness": self.staleness, "weight": self.weight}


@dataclass(frozen=True)
class BufferedRow:
    seq: int
    site: str
    counter: int
    msg_id: str
    base_version: int
    n_samples: int
    staleness: int
    factor: float
    weight: float
    sealed: bytes


@dataclass(frozen=True)
class Checkpoint:
    version: int
    created_at: float
    weights: bytes | None
    momentum: bytes | None
    lineage: dict[str, Any]
    metric: float | None


class Store:
    """All durable state. Thread-safe (one lock); every write method is one transaction."""

    def __init__(self, path: str | Path, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self._db.executescript(SCHEMA)
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- transactions ------------------------------------------------------------
    def _tx(self, statements: Iterable[tuple[str, tuple[Any, ...]]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- meta --------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._tx([("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))])

    # -- verdicts -----------------------------------------------------------------------
    def verdict(self, site: str, counter: int) -> Verdict | None:
        with self._lock:
            row = self._db.execute(
                "SELECT site, counter, msg_id, verdict, reason, detail, version, staleness, weight "
                "FROM verdicts WHERE site = ? AND counter = ?", (site, counter)).fetchone()
        return Verdict(*row) if row else None

    def max_counter(self, site: str) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT MAX(counter) FROM verdicts WHERE site = ?", (site,)).fetchone()
        return row[0]

    @staticmethod
    def _verdict_sql(v: Verdict) -> tuple[str, tuple[Any, ...]]:
        return ("INSERT OR REPLACE INTO verdicts (site, counter, msg_id, verdict, reason, detail, version, "
                "staleness, weight, decided_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (v.site, v.counter, v.msg_id, v.verdict, v.reason, v.detail, v.version, v.staleness, v.weight,
                 time.time()))

    def record(self, v: Verdict) -> None:
        """A verdict that changes no model state (rejected, stale)."""
        self._tx([self._verdict_sql(v)])

    def verdict_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT verdict, COUNT(*) FROM verdicts GROUP BY verdict").fetchall())

    def verdicts(self) -> list[Verdict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT site, counter, msg_id, verdict, reason, detail, version, staleness, weight "
                "FROM verdicts ORDER BY decided_at").fetchall()
        return [Verdict(*r) for r in rows]

    # -- the FedBuff buffer ------------------------------------------------------------
    def add_buffered(self, row: BufferedRow, v: Verdict) -> None:
        """The sealed update and its ``buffered`` verdict, in one transaction."""
        self._tx([
            ("INSERT INTO buffer (site, counter, msg_id, base_version, n_samples, staleness, factor, weight, sealed) "
             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
             (row.site, row.counter, row.msg_id, row.base_version, row.n_samples, row.staleness, row.factor,
              row.weight, row.sealed)),
            self._verdict_sql(v),
        ])

    def buffered(self) -> list[BufferedRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, site, counter, msg_id, base_version, n_samples, staleness, factor, weight, sealed "
                "FROM buffer ORDER BY seq").fetchall()
        return [BufferedRow(*r) for r in rows]

    # -- checkpoints ---------------------------------------------------------------------
    def commit_version(self, version: int, weights: bytes, momentum: bytes | None, lineage: dict[str, Any],
                       applied: list[Verdict], keep: int, metric: float | None = None) -> None:
        """New checkpoint + its updates' ``applied`` verdicts + empty buffer, atomically; prune old blobs."""
        stmts: list[tuple[str, tuple[Any, ...]]] = [
            ("INSERT INTO checkpoints (version, created_at, weights, momentum, lineage, metric) "
             "VALUES (?, ?, ?, ?, ?, ?)", (version, time.time(), weights, momentum, json.dumps(lineage), metric)),
            ("DELETE FROM buffer", ()),
            ("UPDATE checkpoints SET weights = NULL, momentum = NULL WHERE version <= ? AND weights IS NOT NULL",
             (version - keep,)),
        ]
        stmts += [self._verdict_sql(v) for v in applied]
        self._tx(stmts)

    def latest_checkpoint(self) -> Checkpoint | None:
        with self._lock:
            row = self._db.execute(
                "SELECT version, created_at, weights, momentum, lineage, metric FROM checkpoints "
                "WHERE weights IS NOT NULL ORDER BY version DESC LIMIT 1").fetchone()
        return Checkpoint(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5]) if row else None

    def checkpoint(self, version: int) -> Checkpoint | None:
        with self._lock:
            row = self._db.execute(
                "SELECT version, created_at, weights, momentum, lineage, metric FROM checkpoints WHERE version = ?",
                (version,)).fetchone()
        return Checkpoint(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5]) if row else None

    def kept_checkpoints(self) -> list[int]:
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT version FROM checkpoints WHERE weights IS NOT NULL ORDER BY version")]

    def set_metric(self, version: int, metric: float) -> None:
        self._tx([("UPDATE checkpoints SET metric = ? WHERE version = ?", (metric, version))])

    # -- what is on the broker ------------------------------------------------------------
    def mark_published(self, version: int, weights_chunks: int, onnx_chunks: int) -> None:
        self._tx([("INSERT OR REPLACE INTO published (version, weights_chunks, onnx_chunks, published_at, cleared) "
                   "VALUES (?, ?, ?, ?, 0)", (version, weights_chunks, onnx_chunks, time.time()))])

    def published_versions(self, cleared: bool = False) -> list[tuple[int, int, int]]:
        with self._lock:
            return [tuple(r) for r in self._db.execute(
                "SELECT version, weights_chunks, onnx_chunks FROM published WHERE cleared = ? ORDER BY version",
                (1 if cleared else 0,))]

    def mark_cleared(self, version: int) -> None:
        self._tx([("UPDATE published SET cleared = 1 WHERE version = ?", (version,))])
