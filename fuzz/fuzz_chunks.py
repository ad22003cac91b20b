"""Fuzz ``chunking.parse_chunk`` and ``Reassembler``: every update arrives as chunks.

The input is read as a sequence of chunks. Each is either raw bytes (byte 0
even) or built from a few fuzzed fields (byte 0 odd: msg id from a small set,
index, count, total, digest, payload), so the fuzzer easily makes chunks that
agree with each other and reaches reassembly, duplicates, eviction and the
digest check. Invariants checked after every chunk:

- the bytes held for incomplete messages never exceed ``max_bytes`` (a flood of
  chunks cannot exhaust memory, whatever totals they claim);
- a completed message matches the digest its chunks announced.
"""

from __future__ import annotations

import struct

import atheris
from _harness import instrumented, main

with instrumented():
    from broker_bridge import chunking

MAX_BYTES = 1024  # small, so inputs of a few KiB can press against it
_IDS = ["m0", "m1", "m2", "site-a-u1"]


def _structured(fdp: atheris.FuzzedDataProvider, plan: dict[str, tuple[int, int, bytes]]) -> bytes:
    """A chunk whose header fields come from the message's plan (so chunks agree), sometimes not."""
    msg_id = _IDS[fdp.ConsumeIntInRange(0, len(_IDS) - 1)]
    count, total, digest = plan[msg_id]
    if fdp.ConsumeIntInRange(0, 7) == 0:  # now and then a chunk that contradicts its message
        count, total = fdp.ConsumeIntInRange(0, 9), fdp.ConsumeIntInRange(0, 2**64 - 1)
        digest = fdp.ConsumeBytes(16).ljust(16, b"\0")
    index = fdp.ConsumeIntInRange(0, count)  # index == count is out of range on purpose
    payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 400))
    return (
        chunking.MAGIC
        + bytes([len(msg_id)])
        + msg_id.encode()
        + struct.pack("<IIQ16s", index, count, total, digest)
        + payload
    )


def target(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    clock = [0.0]
    r = chunking.Reassembler(timeout_s=10.0, max_bytes=MAX_BYTES, remember_completed=4, clock=lambda: clock[0])
    plan = {
        m: (fdp.ConsumeIntInRange(1, 8), fdp.ConsumeIntInRange(0, 2 * MAX_BYTES), fdp.ConsumeBytes(16).ljust(16, b"\0"))
        for m in _IDS
    }
    for _ in range(64):
        if fdp.remaining_bytes() == 0:
            break
        kind = fdp.ConsumeIntInRange(0, 3)
        clock[0] += fdp.ConsumeIntInRange(0, 4)
        raw = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2048)) if kind == 0 else _structured(fdp, plan)
        try:
            done = r.add(raw)
        except chunking.ChunkError:
            done = None
        assert r.held_bytes <= MAX_BYTES, f"holding {r.held_bytes} bytes, cap {MAX_BYTES}"
        assert r.held_bytes >= 0
        if done is not None:
            _msg_id, blob = done
            parsed = chunking.parse_chunk(raw)
            assert len(blob) == parsed.total <= MAX_BYTES
            assert chunking.message_digest(blob) == parsed.digest
    # parse_chunk alone on the whole input, as the first thing the aggregator does
    chunking.parse_chunk(data)


def seeds() -> list[bytes]:
    chunks = chunking.split(bytes(range(256)) * 8, "m0", max_chunk=600)
    seq = b"".join(b"\x00" + b"\x00" + len(c).to_bytes(2, "little") + c for c in chunks)
    return [chunks[0], seq, b"\x01" * 64, b"\x03\x00\x01\x00\x00\x08" + b"z" * 200]


if __name__ == "__main__":
    main(target, seeds())
