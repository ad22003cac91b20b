"""A group commit writes its buffered updates' bytes at its commit, and none that a reduce in the same group
already put into a version; what stays buffered reads back after a restart."""

from __future__ import annotations

import json

import numpy as np

from aggregator.core import AggregatorCore
from aggregator.store import BufferedRow, Store, Verdict
from tests.aggregator.helpers import make_federation
from tests.aggregator.test_group_commit import SITES, STRATEGY, stream


def _counting(store: Store, calls: list[int] | None = None) -> list[int]:
    """The lengths of the updates ``store`` appends from now on (and into ``calls``, how many per append)."""
    sizes: list[int] = []
    append = store._append

    def counted(name, data):
        sizes.extend(len(d) for d in data)
        if calls is not None:
            calls.append(len(data))
        return append(name, data)

    store._append = counted  # type: ignore[method-assign]
    return sizes


def _buffered(store: Store, site: str, counter: int, sealed: bytes) -> Verdict:
    v = Verdict(site, counter, f"m{counter}", "buffered", None, None, 0, 0, 0.5)
    store.add_buffered(BufferedRow(0, site, counter, v.msg_id, 0, 10, 0, 1.0, 0.5, ""), v, sealed, 0)
    return v


def test_the_bytes_are_written_at_the_groups_commit_and_not_when_its_version_empties_the_buffer(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    calls: list[int] = []
    sizes = _counting(store, calls)
    with store.grouped():
        _buffered(store, "a", 1, b"A" * 1000)
        _buffered(store, "b", 1, b"B" * 2000)
        assert sizes == []  # decided, not yet written: nothing is durable before the commit
    assert sizes == [1000, 2000]
    assert calls == [2]  # the group's bytes in one append (one pwritev), back to back
    with store.grouped():
        c = _buffered(store, "c", 1, b"C" * 3000)
        applied = [Verdict(s, 1, "m1", "applied", None, None, 1, 0, 0.5) for s in ("a", "b", c.site)]
        store.commit_version(1, b"weights", None, {}, applied, keep=3)
    assert sizes == [1000, 2000]  # c went into version 1 in the same transaction: its bytes were never needed
    assert store.buffered() == [] and store.verdict("c", 1).verdict == "applied"
    with store.grouped():
        _buffered(store, "a", 2, b"D" * 500)
    store.close()
    again = Store(tmp_path / "s.sqlite")  # a restart reads what stayed buffered, bytes and all
    assert [(r.site, r.counter, data) for r, data in again.buffered()] == [("a", 2, b"D" * 500)]
    again.close()


def test_a_group_with_a_reduce_writes_only_what_stays_buffered_and_a_restart_rebuilds_that_buffer(tmp_path):
    fed = make_federation(tmp_path, SITES)
    core = AggregatorCore(fed.config(strategy=STRATEGY))
    try:
        blobs = stream(fed, core.model)
        sizes = _counting(core.store)
        decisions = core.decide_many([core.open(b) for b in blobs[:5]])  # K = 3: a reduce, then two more
        assert [d.receipt["verdict"] for d in decisions] == ["buffered", "buffered", "applied", "buffered", "buffered"]
        assert sizes == [len(blobs[3]), len(blobs[4])]
        kept = {(u.site, u.counter): {k: np.array(v) for k, v in u.delta.items()} for u in core.buffer}
    finally:
        core.close()
    again = AggregatorCore(fed.config(strategy=STRATEGY))
    try:
        assert again.version == 1 and [(u.site, u.counter) for u in again.buffer] == list(kept)
        for u in again.buffer:
            for k, v in u.delta.items():
                np.testing.assert_array_equal(v, kept[(u.site, u.counter)][k])
    finally:
        again.close()


def test_a_short_pwritev_is_continued_where_it_stopped(tmp_path, monkeypatch):
    """The kernel may write fewer bytes than asked: the rest follows, and every row reads its own bytes."""
    import aggregator.store as store_module

    real = store_module.os.pwritev
    calls: list[int] = []

    def short(fd, views, at):  # at most 700 bytes per call, cutting through updates
        calls.append(len(views))
        out, left = [], 700
        for v in views:
            out.append(v[:left])
            left -= len(out[-1])
        return real(fd, [v for v in out if len(v)], at)

    monkeypatch.setattr(store_module.os, "pwritev", short)
    store = Store(tmp_path / "s.sqlite")
    with store.grouped():
        _buffered(store, "a", 1, b"A" * 1000)
        _buffered(store, "b", 1, b"B" * 300)
        _buffered(store, "c", 1, b"C" * 1200)
    assert len(calls) == 4  # 2,500 bytes at 700 per call
    assert [(r.site, data) for r, data in store.buffered()] == [
        ("a", b"A" * 1000),
        ("b", b"B" * 300),
        ("c", b"C" * 1200),
    ]
    store.close()


class Executed:
    """The store's connection, noting every statement it executes (the SQL and its arguments)."""

    def __init__(self, db) -> None:
        self.db, self.sql = db, []

    def execute(self, sql: str, *args):
        self.sql.append((sql, *args))
        return self.db.execute(sql, *args)

    def executemany(self, sql: str, rows):
        rows = list(rows)
        self.sql.extend((sql, r) for r in rows)  # one statement per row, as execute would have run them
        return self.db.executemany(sql, rows)

    def __getattr__(self, name: str):
        return getattr(self.db, name)


def _rows(path) -> dict[str, list[tuple]]:
    """Every row a restart reads: verdicts (without their time), the buffer, the checkpoints' lineage."""
    s = Store(path)
    try:
        return {
            "verdicts": s.rows(
                "SELECT site, counter, msg_id, verdict, reason, detail, version, staleness, weight "
                "FROM verdicts ORDER BY site, counter"
            ),
            "buffer": s.rows(
                "SELECT site, counter, msg_id, base_version, file, offset, length FROM buffer ORDER BY seq"
            ),
            "checkpoints": s.rows("SELECT version, weights, lineage FROM checkpoints ORDER BY version"),
        }
    finally:
        s.close()


def test_a_version_s_transaction_leaves_out_the_rows_it_voids_and_commits_the_same_rows(tmp_path):
    """A group that ends at its version inserts no buffered row and one verdict per update (the buffered row
    and the ``buffered`` verdict would be deleted and replaced in the same transaction), and what it commits is
    what one transaction per decision commits."""
    fed = make_federation(tmp_path, SITES)
    grouped = AggregatorCore(fed.config(strategy=STRATEGY, state_dir=str(tmp_path / "g"), name="g.toml"))
    single = AggregatorCore(fed.config(strategy=STRATEGY, state_dir=str(tmp_path / "s"), name="s.toml"))
    try:
        blobs = stream(fed, grouped.model, n=8)
        for b in blobs:
            single.submit(b)  # one transaction per decision: every row inserted, then deleted or replaced
        executed = Executed(grouped.store._db)
        grouped.store._db = executed
        left = [grouped.open(b) for b in blobs]
        while left:
            _, left = grouped.decide_group(left)
        inserts = [s for s in executed.sql if s[0].startswith("INSERT INTO buffer")]
        verdicts = [s[1][:2] for s in executed.sql if s[0].startswith("INSERT OR REPLACE INTO verdicts")]
        assert [(s[1][0], s[1][1]) for s in inserts] == [("site-a", 3), ("site-b", 3)]  # only the two left buffered
        assert sorted(verdicts) == sorted({(v.site, v.counter) for v in single.store.verdicts()})  # one each
        assert len(verdicts) == 8
        paths = grouped.store.path, single.store.path
    finally:
        grouped.close()
        single.close()
    g, s = (_rows(p) for p in paths)
    assert g["verdicts"] == s["verdicts"] and len(g["verdicts"]) == 8
    assert (
        [r[:4] for r in g["buffer"]] == [r[:4] for r in s["buffer"]] == [("site-a", 3, "m6", 2), ("site-b", 3, "m7", 2)]
    )
    assert [(v, json.loads(lin)) for v, _, lin in g["checkpoints"]] == [
        (v, json.loads(lin)) for v, _, lin in s["checkpoints"]
    ]
