"""A group commit writes its buffered updates' bytes at its commit, and none that a reduce in the same group
already put into a version; what stays buffered reads back after a restart."""

from __future__ import annotations

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
