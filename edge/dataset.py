"""The site's bounded local store of training examples, on disk (SQLite).

Why SQLite: a restart (or a power cut) must not forget the data the site had,
and the store must stay bounded on a small disk. Each example is one model
input (a row, or a window of rows) with its label, as float32 blobs. Inserting
past ``max_rows`` evicts the oldest examples. A fixed share of examples is held
out for local evaluation, chosen by a hash of the row id so the split is stable
across restarts and never leaks an example from one side to the other.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import numpy as np

_SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    x BLOB NOT NULL,
    y BLOB,
    holdout INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS examples_holdout ON examples (holdout, id);
"""


def _is_holdout(row_id: int, fraction: float) -> bool:
    """Stable pseudo-random split: Knuth's multiplicative hash of the id."""
    return ((row_id * 2654435761) % 2**32) / 2**32 < fraction


class Dataset:
    """Examples of one input shape; thread-safe (ingest on the loop, training in a worker)."""

    def __init__(self, path: str | Path, input_shape: tuple[int, ...], n_outputs: int | None,
                 max_rows: int, holdout_fraction: float) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.input_shape = tuple(input_shape)
        self.n_outputs = n_outputs  # None for unsupervised (anomaly) data
        self.max_rows = max_rows
        self.holdout_fraction = holdout_fraction
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self.evicted = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, x: np.ndarray, y: np.ndarray | None = None, ts: float | None = None) -> None:
        """Store one example; evict the oldest beyond ``max_rows``."""
        self.add_many([(x, y)], ts)

    def add_many(self, examples: list[tuple[np.ndarray, np.ndarray | None]], ts: float | None = None) -> None:
        """Store several examples in one transaction (cheaper on flash than one commit each)."""
        ts = time.time() if ts is None else ts
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for x, y in examples:
                    xa = np.asarray(x, np.float32)
                    if xa.shape != self.input_shape:
                        raise ValueError(f"example has shape {xa.shape}, the model reads {self.input_shape}")
                    yb = None
                    if self.n_outputs is not None:
                        ya = np.asarray(y, np.float32).reshape(-1)
                        if ya.shape != (self.n_outputs,):
                            raise ValueError(f"label has {ya.size} values, the model has {self.n_outputs} outputs")
                        yb = ya.tobytes()
                    cur = self._db.execute("INSERT INTO examples (ts, x, y, holdout) VALUES (?, ?, ?, 0)",
                                           (ts, xa.tobytes(), yb))
                    if _is_holdout(cur.lastrowid or 0, self.holdout_fraction):
                        self._db.execute("UPDATE examples SET holdout = 1 WHERE id = ?", (cur.lastrowid,))
                over = self._count() - self.max_rows
                if over > 0:
                    self._db.execute(
                        "DELETE FROM examples WHERE id IN (SELECT id FROM examples ORDER BY id LIMIT ?)", (over,))
                    self.evicted += over
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite already rolled back after e.g. SQLITE_FULL
                    self._db.execute("ROLLBACK")
                raise

    def _count(self, holdout: int | None = None) -> int:
        if holdout is None:
            return self._db.execute("SELECT COUNT(*) FROM examples").fetchone()[0]
        return self._db.execute("SELECT COUNT(*) FROM examples WHERE holdout = ?", (holdout,)).fetchone()[0]

    def __len__(self) -> int:
        with self._lock:
            return self._count()

    def counts(self) -> tuple[int, int]:
        """``(training, holdout)`` example counts."""
        with self._lock:
            return self._count(0), self._count(1)

    def arrays(self, holdout: bool = False, newest: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        """All training (or held-out) examples, oldest first; ``newest > 0`` keeps only the newest N."""
        sql = "SELECT x, y FROM examples WHERE holdout = ? ORDER BY id DESC"
        args: tuple = (1 if holdout else 0,)
        if newest > 0:
            sql += " LIMIT ?"
            args += (newest,)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()[::-1]
        x = np.frombuffer(b"".join(r[0] for r in rows), np.float32).reshape(len(rows), *self.input_shape)
        if self.n_outputs is None:
            return x.copy(), None
        y = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), self.n_outputs)
        return x.copy(), y.copy()

    # -- rows by id, for per-record privacy accounting (edge.ledger_privacy.RowIndex) --------------------
    def last_id(self) -> int:
        """The largest row id stored so far (0 when empty); ids only grow (AUTOINCREMENT)."""
        with self._lock:
            row = self._db.execute("SELECT MAX(id) FROM examples").fetchone()
        return int(row[0] or 0)

    def first_id_since(self, ts: float) -> int | None:
        """The smallest id of a row stored at or after ``ts`` (a row's own age decides, no other row's)."""
        with self._lock:
            row = self._db.execute("SELECT MIN(id) FROM examples WHERE ts >= ?", (ts,)).fetchone()
        return None if row[0] is None else int(row[0])

    def count_training(self, lo: int, hi: int) -> int:
        """Training (not held-out) rows with ``lo <= id <= hi``."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM examples WHERE holdout = 0 AND id BETWEEN ? AND ?",
                                        (lo, hi)).fetchone()[0])

    def training_between(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The training examples with ``lo <= id <= hi``, oldest first (the rows a round was given)."""
        with self._lock:
            rows = self._db.execute("SELECT x, y FROM examples WHERE holdout = 0 AND id BETWEEN ? AND ? ORDER BY id",
                                    (lo, hi)).fetchall()
        x = np.frombuffer(b"".join(r[0] for r in rows), np.float32).reshape(len(rows), *self.input_shape)
        if self.n_outputs is None:
            return x.copy(), None
        y = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), self.n_outputs)
        return x.copy(), y.copy()
