"""Chunking in process: limits, reorder, duplicates, interleaving, timeout, memory cap, corruption."""

from __future__ import annotations

import random

import pytest

from broker_bridge.chunking import Reassembler, header_size, parse_chunk, split, split_plain
from broker_bridge.errors import ChunkError, TopicError


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_chunks_respect_the_limit_and_rebuild_the_message() -> None:
    blob = random.Random(0).randbytes(250_001)
    chunks = split(blob, "m1", 10_000)
    assert all(len(c) <= 10_000 for c in chunks)
    assert len(chunks) == -(-len(blob) // (10_000 - header_size("m1")))
    r = Reassembler()
    out = [r.add(c) for c in chunks]
    assert out[:-1] == [None] * (len(chunks) - 1)
    assert out[-1] == ("m1", blob)
    assert r.held_bytes == 0 and len(r) == 0 and r.stats.completed == 1


def test_empty_message_is_one_chunk() -> None:
    (chunk,) = split(b"", "e", 1024)
    assert Reassembler().add(chunk) == ("e", b"")


def test_plain_slices_have_no_header_and_never_begin_with_the_chunk_magic() -> None:
    """An int8 step goes as plain slices (the sites join them by topic index): no 53-byte header, and a message
    one of whose slices would begin with FLC1 (a reader would take it for a chunk) goes with headers."""
    blob = random.Random(1).randbytes(2_501)
    pieces = split_plain(blob, 1_000)
    assert pieces is not None and [len(p) for p in pieces] == [1_000, 1_000, 501] and b"".join(pieces) == blob
    assert split_plain(b"ab", 1_000) == [b"ab"]
    assert split_plain(b"FLC1" + blob, 10_000) is None
    assert split_plain(b"x" * 10 + b"FLC1" + b"y" * 6, 10) is None  # the second slice would begin with it
    assert split_plain(b"x" * 9 + b"FLC1" + b"y" * 7, 10) is not None  # straddling two slices: harmless


def test_split_refuses_limits_that_leave_no_room() -> None:
    with pytest.raises(ValueError, match="no room"):
        split(b"x" * 100, "m1", header_size("m1") + 16)
    with pytest.raises(TopicError):
        split(b"x", "bad/id", 1000)


def test_interleaved_shuffled_duplicated_messages() -> None:
    rng = random.Random(7)
    blobs = {f"m{i}": rng.randbytes(rng.randrange(0, 30_000)) for i in range(8)}
    chunks = [c for m, b in blobs.items() for c in split(b, m, 2048)]
    chunks += rng.sample(chunks, len(chunks) // 3)  # duplicates
    rng.shuffle(chunks)
    r = Reassembler()
    done = {}
    for c in chunks:
        got = r.add(c)
        if got:
            assert got[0] not in done, "a message was delivered twice"
            done[got[0]] = got[1]
    assert done == blobs
    assert r.stats.duplicates == len(chunks) - sum(len(split(b, m, 2048)) for m, b in blobs.items())
    assert r.held_bytes == 0


def test_incomplete_messages_expire_and_are_counted() -> None:
    clock = Clock()
    r = Reassembler(timeout_s=10, clock=clock)
    chunks = split(b"y" * 5000, "slow", 1024)
    for c in chunks[:-1]:
        r.add(c)
    assert len(r) == 1 and r.held_bytes > 0
    clock.t = 11
    assert r.expire() == 1
    assert r.stats.expired == 1 and len(r) == 0 and r.held_bytes == 0
    assert r.add(chunks[-1]) is None  # the straggler starts a new (incomplete) message, nothing bogus
    assert len(r) == 1


def test_memory_cap_evicts_oldest_and_refuses_oversized() -> None:
    r = Reassembler(max_bytes=10_000)
    with pytest.raises(ChunkError, match="exceeds the reassembly cap"):
        r.add(split(b"z" * 20_000, "huge", 4096)[0])
    a = split(b"a" * 8000, "a", 2048)
    b = split(b"b" * 8000, "b", 2048)
    for c in a[:-1]:
        r.add(c)
    for c in b[:-1]:
        r.add(c)
        assert r.held_bytes <= 10_000
    assert r.stats.evicted == 1
    assert r.add(a[-1]) is None  # 'a' was evicted
    assert r.add(b[-1]) == ("b", b"b" * 8000)


@pytest.mark.parametrize("raw", [b"", b"FLC", b"XXXX" + bytes(40), b"FLC1\x05ab", b"FLC1\x02m/" + bytes(40)])
def test_malformed_chunks_are_framing_errors(raw: bytes) -> None:
    r = Reassembler()
    with pytest.raises(ChunkError) as info:
        r.add(raw)
    assert info.value.reason == "framing"
    assert r.stats.malformed == 1


def test_impossible_and_contradictory_chunks() -> None:
    good = split(b"q" * 3000, "m", 1024)
    c = parse_chunk(good[0])
    assert (c.index, c.count, c.total) == (0, len(good), 3000)
    r = Reassembler()
    r.add(good[0])
    other = split(b"Q" * 3000, "m", 1024)  # same id, different digest
    with pytest.raises(ChunkError, match="disagrees"):
        r.add(other[1])
    with pytest.raises(ChunkError, match="impossible"):
        parse_chunk(good[0][:7] + (9).to_bytes(4, "little") + (3).to_bytes(4, "little") + good[0][15:])


def test_truncated_chunk_is_refused_and_the_resend_still_gets_through() -> None:
    """A chunk cut short makes its message fail the digest; a retransmission of the
    same message id (the outbox resends until a receipt) must still be accepted."""
    blob = random.Random(3).randbytes(6000)
    chunks = split(blob, "m7", 1024)
    r = Reassembler()
    cut = list(chunks)
    cut[2] = cut[2][:-100]
    with pytest.raises(ChunkError, match="wrong digest") as info:
        for c in cut:
            r.add(c)
    assert info.value.reason == "framing" and r.stats.corrupt == 1
    assert [r.add(c) for c in chunks][-1] == ("m7", blob)


def forged_chunk(msg_id: str, index: int, count: int, total: int, payload: bytes, digest: bytes = bytes(16)) -> bytes:
    """A chunk with a well-formed header but whatever numbers a hostile sender picks."""
    import struct

    return (
        b"FLC1" + bytes([len(msg_id)]) + msg_id.encode() + struct.pack("<IIQ16s", index, count, total, digest) + payload
    )


def test_one_message_cannot_hold_more_than_it_declared() -> None:
    """A sender declaring a 10 kB message in 100 chunks of 9 kB each must not make
    the reassembler hold 900 kB: the memory cap holds for a single message too."""
    r = Reassembler(max_bytes=10_000)
    refused = 0
    for i in range(100):
        try:
            r.add(forged_chunk("greedy", i, 100, 10_000, b"\x00" * 9000))
        except ChunkError:
            refused += 1
        assert r.held_bytes <= 10_000
    assert refused >= 98


def test_chunks_in_a_reused_buffer_are_copied_and_bytes_chunks_are_not() -> None:
    """A chunk in immutable bytes is held as a view (no copy); one in a buffer its caller may reuse is copied."""
    blob = random.Random(3).randbytes(5000)
    chunks = split(blob, "m1", 1000)
    assert isinstance(parse_chunk(chunks[0]).payload, memoryview)
    r = Reassembler()
    done = None
    for c in chunks:
        buf = bytearray(c)
        done = r.add(buf)
        buf[:] = bytes(len(buf))  # the caller reuses its buffer: what was held must not change
    assert done == ("m1", blob)
