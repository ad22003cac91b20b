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

Large blobs live as files in ``blobs/`` next to the database: checkpoint
weights one file per version, and sealed buffered updates appended to one
log segment per buffer (creating a file per update is slow on overlay file
systems). Bytes are written completely *before* the row that points at them
(file, offset, length) commits, and files are deleted only after the row
that drops them commits; files no row names (left by a crash between the
two) are removed at start, and a torn tail of a segment is never pointed at.
Under group commit (:meth:`Store.grouped`) a group's buffered bytes are written
at its commit, just before the rows; none are written for updates that a
reduce in the same group put into a version (their rows leave the buffer in
that transaction).
An emptied log segment is not deleted but kept (two at most) and overwritten
by a later buffer: writing over pages the page cache holds costs about half
of writing new ones (4 MB: 0.56 against 1.1 ms here); a new buffer's bytes
start after its own rows', so a spare's old bytes are never pointed at.
SQLite then only logs small rows, which keeps a decision well under a
millisecond instead of pushing megabytes through the WAL twice.

So the log of accepted updates is written no later than the model that
contains them, and kill -9 at any point leaves either the old version and
buffer or the new ones, never a mix: no update is lost or counted twice.
Verdicts are kept by ``(site, counter)`` so a resent duplicate (its receipt
was lost) gets its original verdict again; per site the newest
``keep_verdicts`` counters are kept, and at most ``keep_verdicts / 16`` more
(pruned in steps: :meth:`Store._prunes`); an edge resends only what its bounded
outbox still holds, so older ones are never asked for again. ``synchronous=NORMAL`` survives a
killed process; ``fsync = true`` (FULL) also survives a power cut.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Any

Blob = bytes | memoryview | Sequence[bytes | memoryview]  # a file's bytes, or its parts in order

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
    staleness INTEGER NOT NULL, factor REAL NOT NULL, weight REAL NOT NULL, file TEXT NOT NULL,
    offset INTEGER NOT NULL, length INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    version INTEGER PRIMARY KEY, created_at REAL NOT NULL, weights TEXT, momentum TEXT,
    lineage TEXT NOT NULL, metric REAL);
CREATE TABLE IF NOT EXISTS published (
    version INTEGER PRIMARY KEY, weights_chunks INTEGER NOT NULL, onnx_chunks INTEGER NOT NULL,
    published_at REAL NOT NULL, cleared INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS published_by_cleared ON published (cleared, version);
"""


_EMPTY_BUFFER = "DELETE FROM buffer"  # a new version's: every buffered row leaves in its transaction
# the one statement whose arguments hold an _Unwritten (add_buffered): _tx knows it by identity, so the other
# statements of a transaction (most of them) are passed on without looking at their arguments
_INSERT_BUFFERED = (
    "INSERT INTO buffer (site, counter, msg_id, base_version, n_samples, staleness, factor, weight, "
    "file, offset, length) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# a site's verdicts more than keep_verdicts counters below its newest, but never a buffered one's (commit_version)
_PRUNE_VERDICTS = "DELETE FROM verdicts WHERE site = ? AND counter <= ? AND verdict != 'buffered'"
PRUNE_STRIDE_DIVISOR = 16  # a site's old verdicts are pruned when its newest counter moved keep_verdicts / 16
_OFFSET_ARG = 9  # where an _INSERT_BUFFERED row's arguments hold its _Unwritten until the offset is known
# a verdict's row, whole (a later verdict of the same update replaces it): _tx knows it by identity too
_INSERT_VERDICT = (
    "INSERT OR REPLACE INTO verdicts (site, counter, msg_id, verdict, reason, detail, version, "
    "staleness, weight, decided_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _without_voided(statements: list[tuple[str, tuple[Any, ...]]]) -> list[tuple[str, tuple[Any, ...]]]:
    """``statements`` less those whose rows a later statement of the same transaction replaces or deletes: a
    buffered row before the statement that empties the buffer, and a verdict before a later one of the same update.

    Why: a group commit that ends at its version (``AggregatorCore.decide_group``) inserts each of the version's
    updates' buffered row and ``buffered`` verdict, then deletes the one and replaces the other with ``applied``,
    all in one transaction: two statements of the five per update that leave nothing. The committed rows are the
    same: a verdict row is written whole (``INSERT OR REPLACE``), so the last one stands whatever came between.
    """
    emptied_at = max((i for i, (sql, _) in enumerate(statements) if sql == _EMPTY_BUFFER), default=-1)
    last = {(args[0], args[1]): i for i, (sql, args) in enumerate(statements) if sql is _INSERT_VERDICT}
    return [
        (sql, args)
        for i, (sql, args) in enumerate(statements)
        if not (sql is _INSERT_BUFFERED and i < emptied_at)
        and not (sql is _INSERT_VERDICT and last[(args[0], args[1])] != i)
    ]


def _runs(statements: list[tuple[str, tuple[Any, ...]]]) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """``statements`` as runs of the same SQL in a row, each with its arguments in order: what one ``executemany``
    runs (the same rows, in the same order, as one ``execute`` each).

    Why: a version's transaction at K = 10 is about 25 statements, 10 of them its updates' verdicts and 10 their
    notes in the site history; ``executemany`` steps one prepared statement from C, which cut those statements'
    CPU by about a quarter (~30-50 us per version at 100k parameters, 2 Dec 2026;
    ``tests/aggregator/test_commit_cost.py`` checks the order).
    """
    return [(sql, [args for _, args in run]) for sql, run in groupby(statements, key=itemgetter(0))]


def _pwrite_all(fd: int, views: list[memoryview], at: int) -> None:
    """Write ``views`` back to back from offset ``at``, with as few ``pwritev`` calls as the kernel allows."""
    while views:
        n = os.pwritev(fd, views[:512], at)  # IOV_MAX is 1024 on Linux
        at += n
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if views and n:
            views[0] = views[0][n:]


@dataclass(frozen=True)
class _Unwritten:
    """A buffered update's sealed bytes, standing in its row for the offset until its transaction writes them."""

    segment: str
    data: bytes | memoryview


@dataclass(frozen=True)
class Verdict:
    """One update's decision, as stored and as its receipt says it."""

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
        return {
            "site": self.site,
            "counter": self.counter,
            "msg_id": self.msg_id,
            "verdict": self.verdict,
            "reason": self.reason,
            "version": self.version,
            "detail": self.detail,
            "staleness": self.staleness,
            "weight": self.weight,
        }


@dataclass(frozen=True)
class BufferedRow:
    """A buffered update's row (its sealed bytes are in the buffer's log)."""

    seq: int
    site: str
    counter: int
    msg_id: str
    base_version: int
    n_samples: int
    staleness: int
    factor: float
    weight: float
    file: str


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
        self._fsync = fsync
        self.blob_dir = self.path.parent / "blobs"
        self.blob_dir.mkdir(exist_ok=True)
        # (name, fd, end) of the buffer log being appended to: bytes go at ``end``, past every row's
        self._segment: tuple[str, int, int] | None = None
        # emptied buffer logs kept for the next buffer: overwriting pages already in the page cache costs
        # about half of writing new ones (no allocation), and nothing is unlinked per version
        self._spares: list[str] = []
        # every log segment of the current buffer (the rows' files, and any appended to since the buffer was last
        # emptied): what a new version's commit recycles, known without a SELECT (commit_version says why)
        self._segments: set[str] = set()
        # a pruned checkpoint's file, no longer named by any row: the next version's weights overwrite it
        self._spare_checkpoint: str | None = None
        # version -> (weights, momentum) files of each checkpoint whose weights are kept: what a commit prunes,
        # known without a SELECT (commit_version is the only writer of these columns)
        self._kept: dict[int, tuple[str, str | None]] = {}
        # statements that go in the next transaction, whatever it is (a decision's note in the site history)
        self._pending: list[tuple[str, tuple[Any, ...]]] = []
        # site -> its newest counter when this process last pruned its old verdicts (commit_version's _prunes)
        self._pruned_at: dict[str, int] = {}
        # inside grouped(): the verdicts whose rows are pending, so a resend in the same group finds its verdict
        self._grouping = False
        self._pending_verdicts: dict[tuple[str, int], Verdict] = {}
        self._remove_orphans()

    # -- blob files --------------------------------------------------------------
    def _write_blob(self, name: str, data: Blob, reuse: str | None = None) -> str:
        """Write a whole file before any row names it (fsync'd too when ``fsync`` is on).

        ``data`` is the bytes or their parts in order (a checkpoint is written straight from the model's
        arrays, never joined into one 4 MB copy first). ``reuse``: a file no row names any more (a pruned
        checkpoint, :meth:`commit_version`) that becomes this one. Its pages are in the page cache already,
        so overwriting them costs a fifth of allocating a new file's (0.45 against 2.4 ms for 4 MB); until
        the transaction that names it commits it is an orphan like any new file (removed at start).
        """
        path, flags = self.blob_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        if reuse is not None:
            try:
                os.replace(self.blob_dir / reuse, path)
                flags = os.O_WRONLY | os.O_CREAT  # overwritten in place, cut to size below
            except FileNotFoundError:
                pass
        views = [
            memoryview(p).cast("B") for p in ([data] if isinstance(data, (bytes, bytearray, memoryview)) else data)
        ]
        size = sum(len(v) for v in views)
        fd = os.open(path, flags, 0o600)
        try:
            _pwrite_all(fd, views, 0)  # the parts in one system call, not one write per tensor
            os.ftruncate(fd, size)
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return name

    def _read_blob(self, name: str, offset: int = 0, length: int = -1) -> bytes:
        with open(self.blob_dir / name, "rb") as fh:
            fh.seek(offset)
            return fh.read(length)

    def _append(self, name: str, data: Sequence[bytes | memoryview]) -> list[int]:
        """Append ``data`` to buffer segment ``name`` back to back, in one ``pwritev``; the offset of each.

        One system call for a group commit's buffered updates, not one per update. A new segment takes over
        an emptied one's file when there is one (its old bytes lie past every row of the new buffer until
        overwritten: never pointed at). The next offset is the end of the rows' bytes, so whatever a crash
        left after them (a torn write, a write whose row never committed) is overwritten, never pointed at.
        """
        if self._segment is None or self._segment[0] != name:
            self._close_segment()
            path = self.blob_dir / name
            if self._spares and not path.exists():
                os.replace(self.blob_dir / self._spares.pop(), path)
            row = self._db.execute("SELECT MAX(offset + length) FROM buffer WHERE file = ?", (name,)).fetchone()
            self._segment = (name, os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), row[0] or 0)
            self._segments.add(name)
        name, fd, at = self._segment
        offsets = []
        for part in data:
            offsets.append(at)
            at += len(part)
        _pwrite_all(fd, [memoryview(part).cast("B") for part in data], offsets[0] if offsets else at)
        if self._fsync:
            os.fsync(fd)
        self._segment = (name, fd, at)
        return offsets

    def _close_segment(self) -> None:
        if self._segment is not None:
            os.close(self._segment[1])
            self._segment = None

    def _recycle(self, segments: list[str]) -> None:
        """Keep up to two emptied buffer logs for the next buffers (no row names them: gone at a restart)."""
        for name in segments:
            if len(self._spares) < 2:
                spare = f"spare-{name}"
                try:
                    os.replace(self.blob_dir / name, self.blob_dir / spare)
                except FileNotFoundError:
                    continue
                self._spares.append(spare)
            else:
                self._unlink([name])

    def _unlink(self, names: Iterable[str | None]) -> None:
        for n in names:
            if n:
                try:
                    os.unlink(self.blob_dir / n)
                except FileNotFoundError:
                    pass

    def _remove_orphans(self) -> None:
        """Delete the files no row names (left by a crash between bytes and rows); learn the files rows name."""
        with self._lock:
            self._segments = {r[0] for r in self._db.execute("SELECT file FROM buffer")}
            self._kept = {
                v: (w, m)
                for v, w, m in self._db.execute(
                    "SELECT version, weights, momentum FROM checkpoints WHERE weights IS NOT NULL"
                )
            }
            named = self._segments | {x for pair in self._kept.values() for x in pair if x}
        self._unlink(p.name for p in self.blob_dir.iterdir() if p.name not in named)

    def close(self) -> None:
        with self._lock:
            self._close_segment()
            self._db.close()

    # -- transactions ------------------------------------------------------------
    def _tx(self, statements: Iterable[tuple[str, tuple[Any, ...]]]) -> None:
        """One transaction: the pending statements (:meth:`with_next_transaction`), then ``statements``.

        Buffered updates' bytes (:class:`_Unwritten`) are written first, before any row that names them
        commits, except when ``statements`` empty the buffer (a new version): the rows pending before them
        would be deleted in this very transaction, so neither they nor their bytes are written, nor a verdict
        that a later one of the same update replaces (:func:`_without_voided`).
        """
        with self._lock:
            todo = self._written(_without_voided([*self._pending, *statements]))
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in _runs(todo):
                    if len(rows) == 1:
                        self._db.execute(sql, rows[0])
                    else:  # one prepared statement stepped in C: a version's verdicts, its updates' history notes
                        self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise  # the pending statements stay pending: they go with the next transaction that commits
            self._pending.clear()
            self._pending_verdicts.clear()  # committed: the rows answer from now on

    def _written(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[tuple[str, tuple[Any, ...]]]:
        """``statements`` with each buffered row's :class:`_Unwritten` replaced by the offset its bytes were
        appended at: one append per log segment (there is one: a new version, a new segment, commits the rows
        before it). Rows the transaction's own emptying of the buffer deletes are gone already
        (:func:`_without_voided`): their bytes are never written.
        """
        at = [i for i, (sql, _) in enumerate(statements) if sql is _INSERT_BUFFERED]
        if not at:
            return statements
        unwritten: list[_Unwritten] = [statements[i][1][_OFFSET_ARG] for i in at]
        offsets: dict[int, int] = {}
        for segment in dict.fromkeys(u.segment for u in unwritten):
            mine = [k for k, u in enumerate(unwritten) if u.segment == segment]
            offsets.update(zip(mine, self._append(segment, [unwritten[k].data for k in mine])))
        out = list(statements)
        for k, i in enumerate(at):
            sql, args = out[i]
            out[i] = (sql, (*args[:_OFFSET_ARG], offsets[k], *args[_OFFSET_ARG + 1 :]))
        return out

    def _decision_tx(self, statements: list[tuple[str, tuple[Any, ...]]], verdicts: Iterable[Verdict]) -> None:
        """A decision that changes no model state: its own transaction, or inside :meth:`grouped` pending until
        the group's one commit."""
        with self._lock:
            if not self._grouping:
                self._tx(statements)
                return
            self._pending.extend(statements)
            for v in verdicts:
                self._pending_verdicts[(v.site, v.counter)] = v

    @contextmanager
    def grouped(self) -> Iterator[None]:
        """Group commit: the decisions made inside commit in one transaction when the block ends.

        Why: a transaction per buffered update was most of the SQLite cost per update. The caller sends
        the receipts only after the block has ended without an exception: no receipt claims a verdict before
        it is durable. A transaction that runs inside the block for another reason (a reduce's new version)
        takes the pending decisions with it, before its own statements. If the commit fails, the pending
        decisions are dropped and the error raised: the caller must then reload its state from the store
        (``AggregatorCore``: the buffer and the decided counters), and the sites resend for lack of receipts.
        """
        with self._lock:
            if self._grouping:
                raise RuntimeError("grouped() does not nest")
            self._grouping = True
        try:
            yield
            with self._lock:
                if self._pending:
                    self._tx([])
        except BaseException:
            with self._lock:
                self._pending.clear()
            raise
        finally:
            with self._lock:
                self._grouping = False
                self._pending_verdicts.clear()

    def transaction(self, statements: Iterable[tuple[str, tuple[Any, ...]]]) -> None:
        """Run ``statements`` (SQL, args) in one transaction, for the modules whose tables live here."""
        self._tx(statements)

    def with_next_transaction(self, statements: Iterable[tuple[str, tuple[Any, ...]]]) -> None:
        """Run ``statements`` in the next transaction, whichever it is: one commit for a decision and what goes
        with it (``aggregator.recovery``'s note of the update), and never one without the other."""
        with self._lock:
            self._pending.extend(statements)

    def ensure_schema(self, script: str) -> None:
        """Create another module's tables (``CREATE TABLE IF NOT EXISTS``) in this database."""
        with self._lock:
            self._db.executescript(script)

    def rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """The rows of one read (for the modules whose tables live here)."""
        with self._lock:
            return [tuple(r) for r in self._db.execute(sql, args)]

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
            pending = self._pending_verdicts.get((site, counter))
            if pending is not None:
                return pending
            row = self._db.execute(
                "SELECT site, counter, msg_id, verdict, reason, detail, version, staleness, weight "
                "FROM verdicts WHERE site = ? AND counter = ?",
                (site, counter),
            ).fetchone()
        return Verdict(*row) if row else None

    def max_counter(self, site: str) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT MAX(counter) FROM verdicts WHERE site = ?", (site,)).fetchone()
        return row[0]

    @staticmethod
    def _verdict_sql(v: Verdict) -> tuple[str, tuple[Any, ...]]:
        return (
            _INSERT_VERDICT,
            (v.site, v.counter, v.msg_id, v.verdict, v.reason, v.detail, v.version, v.staleness, v.weight, time.time()),
        )

    def record(self, v: Verdict) -> None:
        """A verdict that changes no model state (rejected, stale)."""
        self._decision_tx([self._verdict_sql(v)], [v])

    def last_applied(self) -> dict[str, float]:
        """Each site's newest ``applied`` verdict's wall-clock time (FedAsync's rate state after a restart:
        ``aggregator.site_rate``; written in the transaction of the version that applied it)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT site, MAX(decided_at) FROM verdicts WHERE verdict = 'applied' GROUP BY site"
            ).fetchall()
        return {site: float(at) for site, at in rows}

    def verdict_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT verdict, COUNT(*) FROM verdicts GROUP BY verdict").fetchall())

    def verdicts(self) -> list[Verdict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT site, counter, msg_id, verdict, reason, detail, version, staleness, weight "
                "FROM verdicts ORDER BY decided_at"
            ).fetchall()
        return [Verdict(*r) for r in rows]

    # -- the FedBuff buffer ------------------------------------------------------------
    def add_buffered(
        self, row: BufferedRow, v: Verdict, sealed: bytes, generation: int, replaces: Verdict | None = None
    ) -> None:
        """The sealed update (bytes first) and its ``buffered`` verdict, in one transaction.

        The bytes are written when that transaction runs (:meth:`_tx`): inside :meth:`grouped`, at the
        group's commit, and not at all when a reduce in the same group empties the buffer (its version
        holds the update; receipts go out only after that commit). At 1M parameters an append is about
        a tenth of an update's CPU. ``generation`` (the current version) names the log segment: a reduce empties the buffer, so
        each version's buffer gets its own segment, deleted after the next version commits.
        ``replaces`` is the final verdict of the same site's update this one takes the place of
        (one update per site per buffer): its row leaves the buffer in the same transaction.
        """
        with self._lock:
            name = f"buffer-{generation}.log"
            drop: list[tuple[str, tuple[Any, ...]]] = []
            if replaces is not None:
                drop = [
                    ("DELETE FROM buffer WHERE site = ? AND counter = ?", (replaces.site, replaces.counter)),
                    self._verdict_sql(replaces),
                ]
            self._decision_tx(
                [
                    *drop,
                    (
                        _INSERT_BUFFERED,
                        (
                            row.site,
                            row.counter,
                            row.msg_id,
                            row.base_version,
                            row.n_samples,
                            row.staleness,
                            row.factor,
                            row.weight,
                            name,
                            _Unwritten(name, sealed),  # the offset, once written (_tx)
                            len(sealed),
                        ),
                    ),
                    self._verdict_sql(v),
                ],
                [v] if replaces is None else [replaces, v],
            )

    def unbuffer(self, verdicts: Sequence[Verdict]) -> None:
        """Buffered updates taken out of the buffer with their final ``verdicts``, in one transaction: a site revoked
        while its update waited (``AggregatorCore.take_enrollment``; a restart would find the update unreadable)."""
        statements: list[tuple[str, tuple[Any, ...]]] = []
        for v in verdicts:
            statements += [
                ("DELETE FROM buffer WHERE site = ? AND counter = ?", (v.site, v.counter)),
                self._verdict_sql(v),
            ]
        self._decision_tx(statements, verdicts)

    def buffered(self) -> list[tuple[BufferedRow, bytes]]:
        """Buffered updates in arrival order, each with its sealed bytes."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, site, counter, msg_id, base_version, n_samples, staleness, factor, weight, file, "
                "offset, length FROM buffer ORDER BY seq"
            ).fetchall()
        return [(BufferedRow(*r[:10]), self._read_blob(r[9], r[10], r[11])) for r in rows]

    # -- checkpoints ---------------------------------------------------------------------
    def commit_version(
        self,
        version: int,
        weights: Blob,
        momentum: Blob | None,
        lineage: dict[str, Any],
        applied: list[Verdict],
        keep: int,
        metric: float | None = None,
        keep_verdicts: int | None = None,
        keep_buffer: bool = False,
    ) -> None:
        """New checkpoint + its updates' ``applied`` verdicts + empty buffer, atomically; prune old blobs.

        ``keep_buffer``: the buffer stays (a plant adopting a central model, ``plant.core``); its log
        segments then stay until a later commit empties it.

        With ``keep_verdicts``, each site in ``applied`` also loses the (non-buffered) verdicts more than
        that many counters below its newest: an index range per site, so pruning costs nothing per
        update however long the aggregator runs; a site's range is deleted once its newest counter moved a
        sixteenth of ``keep_verdicts`` past its last prune (:meth:`_prunes`), not at every version.

        The checkpoints it prunes and the buffer's log segments it empties are known from memory (``_kept``,
        ``_segments``, read from the rows at start): their two SELECTs, the first statements after the reduce's
        arithmetic, cost 75-130 us per version at K = 10 with the BEGIN after them, against 50-60 us for the
        BEGIN alone now (2 Dec 2026, 100k parameters: what the first statement pays wherever it is). The pruned
        checkpoints' rows are updated by version: ``version <= ? AND weights IS NOT NULL`` read every older
        checkpoint row, every version, so a commit's cost grew with the versions ever made (its UPDATE alone:
        1.3 ms at version 2,500, 7 ms at 10,000, 15 ms at 20,000 on 2 Dec 2026).
        """
        w = self._write_blob(f"model-{version}.weights", weights, reuse=self._spare_checkpoint)
        self._spare_checkpoint = None
        m = self._write_blob(f"model-{version}.momentum", momentum) if momentum is not None else None
        with self._lock:
            dropped_buffer = [] if keep_buffer else sorted(self._segments)
            pruned = sorted(v for v in self._kept if v <= version - keep)
            stmts: list[tuple[str, tuple[Any, ...]]] = [
                (
                    "INSERT INTO checkpoints (version, created_at, weights, momentum, lineage, metric) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (version, time.time(), w, m, json.dumps(lineage), metric),
                ),
                *([] if keep_buffer else [(_EMPTY_BUFFER, ())]),
                *[("UPDATE checkpoints SET weights = NULL, momentum = NULL WHERE version = ?", (v,)) for v in pruned],
            ]
            stmts += [self._verdict_sql(v) for v in applied]
            prunes: dict[str, int] = {}
            if keep_verdicts is not None:
                prunes = self._prunes(applied, keep_verdicts)
                stmts += [(_PRUNE_VERDICTS, (site, top - keep_verdicts)) for site, top in prunes.items()]
            self._tx(stmts)
            self._pruned_at.update(prunes)
            # committed: the files no row names any more can go
            self._kept[version] = (w, m)
            files = [x for v in pruned for x in self._kept.pop(v) if x]
            self._close_segment()
            if not keep_buffer:
                self._segments.clear()
            self._recycle(dropped_buffer)
            self._drop_checkpoints(files)

    def _prunes(self, applied: list[Verdict], keep_verdicts: int) -> dict[str, int]:
        """The sites of ``applied`` whose old verdicts this version prunes, each with its newest counter: those whose
        newest counter moved :data:`PRUNE_STRIDE_DIVISOR`-th of ``keep_verdicts`` (at least 1) past the one of
        their last prune in this process, or that were not pruned since it started.

        Why not every site every version: at K = 10 that was 10 range deletes per version, each finding one row
        at most (none until a site's counters pass ``keep_verdicts``): 29-53 us of the decide thread's CPU per
        version at 100k parameters (2 Dec 2026), of a commit's ~1 ms. Per site the verdicts of the newest
        ``keep_verdicts`` counters are still always kept, and of at most ``keep_verdicts + stride - 1``
        (``tests/aggregator/test_commit_cost.py``).
        """
        newest: dict[str, int] = {}
        for v in applied:
            newest[v.site] = max(newest.get(v.site, v.counter), v.counter)
        stride = max(1, keep_verdicts // PRUNE_STRIDE_DIVISOR)
        return {
            site: top
            for site, top in newest.items()
            if (last := self._pruned_at.get(site)) is None or top - last >= stride
        }

    def _drop_checkpoints(self, files: list[str]) -> None:
        """Files of checkpoints a committed transaction pruned: the first takes the next version's weights
        (:meth:`_write_blob`'s ``reuse``), the others are deleted."""
        if files:
            self._spare_checkpoint = files.pop(0)
        self._unlink(files)

    def _checkpoint(self, row: Any, blobs: bool = True) -> Checkpoint | None:
        """The row's checkpoint; called under the lock, so its files are read before a commit can prune
        them and a later version overwrite them (:meth:`_write_blob`'s ``reuse``)."""
        if row is None:
            return None
        return Checkpoint(
            row[0],
            row[1],
            self._read_blob(row[2]) if row[2] and blobs else None,
            self._read_blob(row[3]) if row[3] and blobs else None,
            json.loads(row[4]),
            row[5],
        )

    def latest_checkpoint(self) -> Checkpoint | None:
        with self._lock:
            row = self._db.execute(
                "SELECT version, created_at, weights, momentum, lineage, metric FROM checkpoints "
                "WHERE weights IS NOT NULL ORDER BY version DESC LIMIT 1"
            ).fetchone()
            return self._checkpoint(row)

    def checkpoint(self, version: int, blobs: bool = True) -> Checkpoint | None:
        """A version's checkpoint (``weights`` None once pruned, or unless ``blobs``; lineage is kept)."""
        with self._lock:
            row = self._db.execute(
                "SELECT version, created_at, weights, momentum, lineage, metric FROM checkpoints WHERE version = ?",
                (version,),
            ).fetchone()
            return self._checkpoint(row, blobs)

    def kept_checkpoints(self) -> list[int]:
        with self._lock:
            return [
                r[0]
                for r in self._db.execute("SELECT version FROM checkpoints WHERE weights IS NOT NULL ORDER BY version")
            ]

    def set_metric(self, version: int, metric: float) -> None:
        self._tx([("UPDATE checkpoints SET metric = ? WHERE version = ?", (metric, version))])

    # -- what is on the broker ------------------------------------------------------------
    def mark_published(self, version: int, weights_chunks: int, onnx_chunks: int) -> None:
        self._tx(
            [
                (
                    "INSERT OR REPLACE INTO published (version, weights_chunks, onnx_chunks, published_at, cleared) "
                    "VALUES (?, ?, ?, ?, 0)",
                    (version, weights_chunks, onnx_chunks, time.time()),
                )
            ]
        )

    def published_versions(self, cleared: bool = False) -> list[tuple[int, int, int]]:
        """The versions on the broker (or cleared from it), oldest first.

        Read once per version (the service's ``_clear_old``): through the index ``published_by_cleared``, so
        it reads the few versions still published, not every version ever published (a scan of the table was
        1.3 ms at 20,000 versions, growing by 0.07 ms per thousand; 2 Dec 2026).
        """
        with self._lock:
            return [
                tuple(r)
                for r in self._db.execute(
                    "SELECT version, weights_chunks, onnx_chunks FROM published WHERE cleared = ? ORDER BY version",
                    (1 if cleared else 0,),
                )
            ]

    def mark_cleared(self, version: int) -> None:
        self._tx([("UPDATE published SET cleared = 1 WHERE version = ?", (version,))])
