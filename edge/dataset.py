"""The site's bounded local store of training examples, on disk (SQLite).

Why SQLite: a restart (or a power cut) must not forget the data the site had,
and the store must stay bounded on a small disk. Each example is one model
input (a row, or a window of rows) with its label, as float32 blobs. Inserting
past ``max_rows`` evicts the oldest examples. A fixed share of examples is held
out for local evaluation (and for picking the model the line serves, see
:mod:`edge.personal`), by one of three rules (:func:`holdout_mask`):

- ``group``: rows of one unit (machine, engine, batch: the value of
  ``[dataset] group_column``) are all held out or all trained on, by a hash of
  the unit, so a model cannot memorise a unit's trajectory and be scored on it;
- ``time`` (the default without a group column): the newest rows are held out,
  as a time-ordered stream is scored on what comes after what it learnt from;
- ``random``: a hash of the row id, only for rows that are independent.

Group and random are fixed at insert (stable across restarts, no example ever
moves from one side to the other); time is decided when the rows are read.
"""

from __future__ import annotations

import hashlib
import math
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

_SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    x BLOB NOT NULL,
    y BLOB,
    holdout INTEGER NOT NULL,
    historical INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS examples_holdout ON examples (holdout, id);
"""
#: Columns added after the first release, with their definitions: an older store gains them on open.
#: ``unit``: the row's unit (``[dataset] group_column``, :func:`group_key`), so the served-model pick can test
#: candidates over validation units, not rows (edge/personal.py); NULL for rows stored without one.
_ADDED_COLUMNS = {"historical": "INTEGER NOT NULL DEFAULT 0", "unit": "TEXT"}


Split = Literal["time", "random", "group"]


def _is_holdout(row_id: int, fraction: float) -> bool:
    """Stable pseudo-random split: Knuth's multiplicative hash of the id."""
    return ((row_id * 2654435761) % 2**32) / 2**32 < fraction


def group_key(value: Any) -> str:
    """A unit's value as text, the same whether it came as ``"7"`` from a CSV or ``7.0`` from a register."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (int, float)):
        v = float(value)
        return str(int(v)) if math.isfinite(v) and v == int(v) else repr(v)
    text = str(value).strip()
    try:
        return group_key(float(text))
    except ValueError:
        return text


def group_in_holdout(key: str, fraction: float) -> bool:
    """Whether a unit is held out: a stable hash (BLAKE2b) of its key below ``fraction``."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


def holdout_mask(n: int, fraction: float, split: Split, groups: Sequence[Any] | None = None) -> np.ndarray:
    """Which of ``n`` rows (in arrival order: row ids 1..n) the edge holds out under ``split``.

    The demo's in-process comparison calls this with the rows it hands a site,
    so it holds out exactly what that site's edge agent would.
    """
    if split == "group":
        if groups is None or len(groups) != n:
            raise ValueError("split 'group' needs one group value per row")
        return np.array([group_in_holdout(group_key(g), fraction) for g in groups], dtype=bool)
    if split == "random":
        return np.array([_is_holdout(i + 1, fraction) for i in range(n)], dtype=bool)
    mask = np.zeros(n, dtype=bool)
    k = time_holdout_count(n, fraction)
    if k:
        mask[n - k :] = True
    return mask


def time_holdout_count(n: int, fraction: float) -> int:
    """How many of the newest ``n`` rows a time split holds out."""
    return round(n * fraction) if n > 1 else 0


class Dataset:
    """Examples of one input shape; thread-safe (ingest on the loop, training in a worker)."""

    def __init__(
        self,
        path: str | Path,
        input_shape: tuple[int, ...],
        n_outputs: int | None,
        max_rows: int,
        holdout_fraction: float,
        split: Split = "random",
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.input_shape = tuple(input_shape)
        self.n_outputs = n_outputs  # None for unsupervised (anomaly) data
        self.max_rows = max_rows
        self.holdout_fraction = holdout_fraction
        self.split: Split = split
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        have = {r[1] for r in self._db.execute("PRAGMA table_info(examples)")}
        for name, definition in _ADDED_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE examples ADD COLUMN {name} {definition}")
        self.evicted = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, x: np.ndarray, y: np.ndarray | None = None, ts: float | None = None) -> None:
        """Store one example; evict the oldest beyond ``max_rows``."""
        self.add_many([(x, y)], ts)

    def add_many(
        self,
        examples: list[tuple[np.ndarray, np.ndarray | None]],
        ts: float | None = None,
        groups: Sequence[Any] | None = None,
        historical: Sequence[bool] | None = None,
    ) -> None:
        """Store several examples in one transaction (cheaper on flash than one commit each).

        ``groups`` (split ``group``): each example's unit; a unit's rows all land on one side.
        ``historical``: each example's mark for late data (Sparkplug ``is_historical``: a device's
        store-and-forward after an outage). Such rows are real measurements, so they are trained on, but
        the mark is kept so an operator can tell backfill from live rows (:meth:`historical_count`).
        """
        ts = time.time() if ts is None else ts
        if self.split == "group" and (groups is None or len(groups) != len(examples)):
            raise ValueError("this dataset splits by group: give each example's group value")
        if historical is not None and len(historical) != len(examples):
            raise ValueError(f"{len(historical)} historical marks for {len(examples)} examples")
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for i, (x, y) in enumerate(examples):
                    xa = np.asarray(x, np.float32)
                    if xa.shape != self.input_shape:
                        raise ValueError(f"example has shape {xa.shape}, the model reads {self.input_shape}")
                    yb = None
                    if self.n_outputs is not None:
                        ya = np.asarray(y, np.float32).reshape(-1)
                        if ya.shape != (self.n_outputs,):
                            raise ValueError(f"label has {ya.size} values, the model has {self.n_outputs} outputs")
                        yb = ya.tobytes()
                    late = 1 if historical is not None and historical[i] else 0
                    unit = None if groups is None or groups[i] is None else group_key(groups[i])
                    cur = self._db.execute(
                        "INSERT INTO examples (ts, x, y, holdout, historical, unit) VALUES (?, ?, ?, 0, ?, ?)",
                        (ts, xa.tobytes(), yb, late, unit),
                    )
                    if self._held_out(cur.lastrowid or 0, groups[i] if groups is not None else None):
                        self._db.execute("UPDATE examples SET holdout = 1 WHERE id = ?", (cur.lastrowid,))
                over = self._count() - self.max_rows
                if over > 0:
                    self._db.execute(
                        "DELETE FROM examples WHERE id IN (SELECT id FROM examples ORDER BY id LIMIT ?)", (over,)
                    )
                    self.evicted += over
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite already rolled back after e.g. SQLITE_FULL
                    self._db.execute("ROLLBACK")
                raise

    def _held_out(self, row_id: int, group: Any) -> bool:
        """The fixed-at-insert rules (group, random); time is decided on reading."""
        if self.split == "group":
            return group_in_holdout(group_key(group), self.holdout_fraction)
        if self.split == "random":
            return _is_holdout(row_id, self.holdout_fraction)
        return False

    def _time_cut(self) -> int | None:
        """Time split: the id from which rows are held out (None: nothing held out)."""
        n = self._count()
        k = time_holdout_count(n, self.holdout_fraction)
        if k == 0:
            return None
        return self._db.execute("SELECT id FROM examples ORDER BY id DESC LIMIT 1 OFFSET ?", (k - 1,)).fetchone()[0]

    def _count(self, holdout: int | None = None) -> int:
        if holdout is None:
            return self._db.execute("SELECT COUNT(*) FROM examples").fetchone()[0]
        if self.split == "time":
            n = self._count()
            k = time_holdout_count(n, self.holdout_fraction)
            return k if holdout else n - k
        return self._db.execute("SELECT COUNT(*) FROM examples WHERE holdout = ?", (holdout,)).fetchone()[0]

    def __len__(self) -> int:
        with self._lock:
            return self._count()

    def historical_count(self) -> int:
        """Examples stored from samples marked historical (late data), of those still kept."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM examples WHERE historical = 1").fetchone()[0])

    def counts(self) -> tuple[int, int]:
        """``(training, holdout)`` example counts."""
        with self._lock:
            return self._count(0), self._count(1)

    def arrays(self, holdout: bool = False, newest: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        """All training (or held-out) examples, oldest first; ``newest > 0`` keeps only the newest N."""
        x, y, _ = self._select(holdout, newest, "NULL")
        return x, y

    def arrays_with_units(self, holdout: bool = False) -> tuple[np.ndarray, np.ndarray | None, list[str | None]]:
        """:meth:`arrays` and each example's unit (None where stored without one), read in one query so
        that rows arriving meanwhile cannot shift the units against the rows."""
        return self._select(holdout, 0, "unit")

    def _select(
        self, holdout: bool, newest: int, unit_column: str
    ) -> tuple[np.ndarray, np.ndarray | None, list[str | None]]:
        sql = f"SELECT x, y, {unit_column} FROM examples WHERE holdout = ? ORDER BY id DESC"
        args: tuple = (1 if holdout else 0,)
        with self._lock:
            if self.split == "time":
                cut = self._time_cut()
                where = "id >= ?" if holdout else "id < ?"
                sql = f"SELECT x, y, {unit_column} FROM examples WHERE {where} ORDER BY id DESC"
                args = (cut if cut is not None else 2**62,)
            if newest > 0:
                sql += " LIMIT ?"
                args += (newest,)
            rows = self._db.execute(sql, args).fetchall()[::-1]
        x = np.frombuffer(b"".join(r[0] for r in rows), np.float32).reshape(len(rows), *self.input_shape)
        units = [r[2] for r in rows]
        if self.n_outputs is None:
            return x.copy(), None, units
        y = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), self.n_outputs)
        return x.copy(), y.copy(), units

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

    def _training_hi(self, hi: int) -> int:
        """``hi`` lowered below a time split's held-out (newest) rows."""
        if self.split != "time":
            return hi
        cut = self._time_cut()
        return hi if cut is None else min(hi, cut - 1)

    def count_training(self, lo: int, hi: int) -> int:
        """Training (not held-out) rows with ``lo <= id <= hi``."""
        with self._lock:
            hi = self._training_hi(hi)
            return int(
                self._db.execute(
                    "SELECT COUNT(*) FROM examples WHERE holdout = 0 AND id BETWEEN ? AND ?", (lo, hi)
                ).fetchone()[0]
            )

    def training_between(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The training examples with ``lo <= id <= hi``, oldest first (the rows a round was given)."""
        with self._lock:
            hi = self._training_hi(hi)
            rows = self._db.execute(
                "SELECT x, y FROM examples WHERE holdout = 0 AND id BETWEEN ? AND ? ORDER BY id", (lo, hi)
            ).fetchall()
        x = np.frombuffer(b"".join(r[0] for r in rows), np.float32).reshape(len(rows), *self.input_shape)
        if self.n_outputs is None:
            return x.copy(), None
        y = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), self.n_outputs)
        return x.copy(), y.copy()


class UnitTracker:
    """The unit (``[dataset] group_column``) the newest rows belong to, from the samples' values.

    Tags arrive in several samples (poll groups, messages): the latest value
    seen is the current unit, like the row builder's other tags. ``observe``
    says when it changed, so the agent restarts the row window there.
    """

    def __init__(self, column: str | None) -> None:
        self.column = column
        self.current: str | None = None

    def observe(self, values: dict[str, Any]) -> bool:
        """Update from one sample's values; True when the unit changed."""
        if self.column is None or self.column not in values:
            return False
        key = group_key(values[self.column])
        changed = self.current is not None and key != self.current
        self.current = key
        return changed
