"""An outbox write that fails (disk full) in the sender is counted and said; the agent keeps running.

A regression test: the agent exited when the disk filled between a publish and its ``mark_sent``
(``sqlite3.OperationalError: database or disk is full`` out of the sender's loop; caught by
tests/faults/test_disk_full.py on 1 Dec 2026). Here the outbox's ``mark_sent`` raises the error SQLite raises on a
full disk; the second test shows SQLite itself raising it, with the outbox left as it was, on a database capped with
``PRAGMA max_page_count``. The end-to-end path (a real small file system) is tests/faults/test_disk_full.py's.
"""

from __future__ import annotations

import sqlite3
from types import SimpleNamespace
from typing import Any

from broker_bridge.topics import Topics
from edge.metrics import EdgeMetrics
from edge.outbox import Outbox
from edge.sender import Sender


class _Client:
    """Accepts every publish (the broker acknowledged it): only the outbox's write can fail."""

    def __init__(self) -> None:
        self.published: list[str] = []

    def chunk_limit(self, topic: str) -> int:
        return 1 << 20

    async def publish_many(self, items: list[tuple[str, bytes]], qos: int) -> None:
        self.published += [t for t, _ in items]


def _state(outbox: Outbox) -> Any:
    errors: list[str] = []
    return SimpleNamespace(
        site="site-a",
        outbox=outbox,
        topics=Topics("fed"),
        base=SimpleNamespace(manifest={}),
        metrics=EdgeMetrics("site-a"),
        errors=errors,
        error=errors.append,
    )


def _fill_the_disk(outbox: Outbox) -> None:
    """Cap the database at its present size: SQLite then refuses any write that needs a page (SQLITE_FULL)."""
    db = outbox._db
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("PRAGMA journal_mode = DELETE")
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")
    db.execute("CREATE TABLE IF NOT EXISTS probe (x BLOB)")  # would need a page


async def test_a_failed_mark_sent_keeps_the_row_queued_counts_it_and_does_not_raise(tmp_path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite", max_bytes=1 << 20, max_count=10)
    outbox.put(site="site-a", counter=1, msg_id="m1", base_version=0, n_samples=10, epsilon=None, blob=b"x" * 5000)
    st = _state(outbox)
    sender = Sender(st)
    client = _Client()
    real = outbox.mark_sent

    def full(msg_id: str) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    outbox.mark_sent = full  # type: ignore[method-assign]
    row = outbox.rows()[0]
    assert await sender.publish_row(client, row) is False  # it went out, but is not marked: it will go again
    assert client.published and outbox.rows()[0].sent_at is None
    assert st.metrics.outbox_write_failed.labels("mark_sent")._value.get() == 1
    assert st.metrics.published._value.get() == 0
    assert st.errors and "disk is full" in st.errors[-1] and "mark_sent" in st.errors[-1]
    outbox.mark_sent = real  # type: ignore[method-assign]
    assert await sender.publish_row(client, row) is True  # room again: marked sent
    assert outbox.rows()[0].sent_at is not None


def test_sqlite_itself_refuses_the_write_on_a_full_database(tmp_path) -> None:
    """The error the sender now survives is SQLite's own, with the outbox left as it was."""
    outbox = Outbox(tmp_path / "outbox.sqlite", max_bytes=1 << 20, max_count=10)
    outbox.put(site="site-a", counter=1, msg_id="m1", base_version=0, n_samples=10, epsilon=None, blob=b"x" * 5000)
    try:
        _fill_the_disk(outbox)
    except sqlite3.OperationalError as exc:
        assert "full" in str(exc)
    else:
        raise AssertionError("a capped database accepted a new table")
    try:
        outbox.put(site="site-a", counter=2, msg_id="m2", base_version=0, n_samples=10, epsilon=None, blob=b"y" * 5000)
    except sqlite3.OperationalError as exc:
        assert "full" in str(exc)
    else:
        raise AssertionError("a capped database accepted a 5 kB row")
    assert [r.msg_id for r in outbox.rows()] == ["m1"]
