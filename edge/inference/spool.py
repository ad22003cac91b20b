"""A bounded on-disk spool for the line's MQTT predictions while the plant broker is away.

The same rules as the edge's outbox (:mod:`edge.outbox`), on the same footing:
every message is on disk (SQLite, WAL, opened by :func:`edge.outbox.open_queue_db`)
before any attempt to send it; messages leave strictly in order and are removed
only once published (QoS 1: the broker's PUBACK); the spool is bounded by a
count and by bytes. Where the two differ, and why: a full outbox stops training
(an update is paid for in ε), a full spool drops its *oldest* messages, counted,
because the line must keep scoring and the JSON-lines file keeps every
prediction anyway; and the spool commits with ``synchronous=NORMAL`` (it
survives a crash of the process, a power cut may cost the last moments), since
it is written from the scoring loop up to thousands of times a second. A
restart resumes from what is on disk.
"""

from __future__ import annotations

import threading
from pathlib import Path

from edge.outbox import open_queue_db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL
);
"""


class PredictionSpool:
    """FIFO of ``(topic, payload)`` on disk, at most ``max_count`` messages and ``max_bytes`` bytes."""

    def __init__(self, path: str | Path, max_count: int, max_bytes: int) -> None:
        if max_count < 1 or max_bytes < 1:
            raise ValueError("the spool needs max_count >= 1 and max_bytes >= 1")
        self.path = Path(path)
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db = open_queue_db(self.path, _SCHEMA, synchronous="NORMAL")
        self.dropped = 0

    def put(self, items: list[tuple[str, bytes]]) -> int:
        """Append ``items`` in one transaction; returns how many of the oldest were dropped for room."""
        dropped = 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO spool (topic, payload, size) VALUES (?, ?, ?)", [(t, p, len(p)) for t, p in items]
                )
                n, b = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM spool").fetchone()
                while n > self.max_count or b > self.max_bytes:
                    seq, size = self._db.execute("SELECT seq, size FROM spool ORDER BY seq LIMIT 1").fetchone()
                    self._db.execute("DELETE FROM spool WHERE seq = ?", (seq,))
                    n, b, dropped = n - 1, b - size, dropped + 1
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        self.dropped += dropped
        return dropped

    def head(self, n: int = 1) -> list[tuple[int, str, bytes]]:
        """The oldest ``n`` messages ``(seq, topic, payload)``, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT seq, topic, payload FROM spool ORDER BY seq LIMIT ?", (n,)).fetchall()
        return [(int(r[0]), str(r[1]), bytes(r[2])) for r in rows]

    def remove_through(self, seq: int) -> None:
        """Forget every message up to ``seq`` once published (one transaction for many)."""
        with self._lock:
            self._db.execute("DELETE FROM spool WHERE seq <= ?", (seq,))

    def depth(self) -> tuple[int, int]:
        """``(messages, bytes)`` waiting."""
        with self._lock:
            n, b = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM spool").fetchone()
        return int(n), int(b)

    def close(self) -> None:
        with self._lock:
            self._db.close()
