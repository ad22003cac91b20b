"""The buffer log's segments: an emptied one is overwritten by a later buffer, and no row ever points at stale bytes."""

from __future__ import annotations

import os

from aggregator.store import BufferedRow, Store, Verdict


def buffer_one(store: Store, site: str, counter: int, blob: bytes, generation: int) -> None:
    row = BufferedRow(0, site, counter, f"m{counter}", generation, 10, 0, 1.0, 0.1, "")
    store.add_buffered(row, Verdict(site, counter, f"m{counter}", "buffered", None, None, generation), blob, generation)


def reduce_all(store: Store, version: int) -> None:
    applied = [Verdict(r.site, r.counter, r.msg_id, "applied", None, None, version) for r, _ in store.buffered()]
    store.commit_version(version, b"weights", None, {"updates": []}, applied, keep=2)


def test_a_later_buffer_overwrites_an_emptied_segment_and_reads_back_only_its_own_bytes(tmp_path) -> None:
    store = Store(tmp_path / "agg.sqlite")
    big = [bytes([i]) * 50_000 for i in range(1, 4)]
    for i, blob in enumerate(big):
        buffer_one(store, f"s{i}", 1, blob, 0)
    reduce_all(store, 1)  # buffer-0.log emptied: kept as a spare, not deleted
    assert sorted(p.name for p in store.blob_dir.glob("spare-*")) == ["spare-buffer-0.log"]
    small = [b"\xaa" * 1_000, b"\xbb" * 2_000]
    for i, blob in enumerate(small):
        buffer_one(store, f"s{i}", 2, blob, 1)
    # the spare became buffer-1.log (its 150 kB are still there, past the new rows) and nothing else remains
    assert not list(store.blob_dir.glob("spare-*"))
    assert os.path.getsize(store.blob_dir / "buffer-1.log") == 150_000
    assert [b for _, b in store.buffered()] == small
    store.close()
    # a restart mid-buffer: the next bytes go right after the rows' (offset 3,000), not at the file's end
    store = Store(tmp_path / "agg.sqlite")
    buffer_one(store, "s2", 2, b"\xcc" * 500, 1)
    assert [b for _, b in store.buffered()] == [*small, b"\xcc" * 500]
    assert (store.blob_dir / "buffer-1.log").read_bytes()[3_000:3_500] == b"\xcc" * 500
    store.close()


def test_bytes_written_for_a_row_that_never_committed_are_overwritten_after_a_restart(tmp_path) -> None:
    store = Store(tmp_path / "agg.sqlite")
    buffer_one(store, "a", 1, b"\x01" * 100, 0)
    store._append("buffer-0.log", [b"\xee" * 70])  # a crash between the write and its row's commit
    store.close()
    store = Store(tmp_path / "agg.sqlite")
    buffer_one(store, "b", 1, b"\x02" * 100, 0)
    assert [b for _, b in store.buffered()] == [b"\x01" * 100, b"\x02" * 100]
    assert (store.blob_dir / "buffer-0.log").read_bytes() == b"\x01" * 100 + b"\x02" * 100
    store.close()
