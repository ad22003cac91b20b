"""Split sealed messages into chunks under a broker's size limit, and put them back.

Why: managed brokers cap a message at 128 KB or so, and a model delta is
megabytes. Each chunk carries a small self-describing header, so reassembly
needs nothing from the topic and tolerates reordering, duplicates and many
interleaved messages. A message that never completes is forgotten after a
timeout, and the bytes held for incomplete messages are capped, so a flood of
first chunks cannot exhaust memory.

Chunk layout (little-endian)::

    b"FLC1" | msg_id (u8 length + ASCII) | index u32 | count u32 | total u64 |
    digest (16 bytes, truncated SHA-256 of the whole message) | payload
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from broker_bridge.errors import ChunkError, TopicError
from broker_bridge.topics import validate_site_id

MAGIC = b"FLC1"
DEFAULT_MAX_CHUNK = 100 * 1024
MAX_CHUNKS = 1 << 20
_TAIL = struct.Struct("<IIQ16s")


def header_size(msg_id: str) -> int:
    return len(MAGIC) + 1 + len(msg_id) + _TAIL.size


def max_payload_for_packet(max_packet_size: int, topic: str, overhead: int = 32) -> int:
    """Largest chunk (header included) whose PUBLISH fits an MQTT 5 Maximum Packet Size.

    ``overhead`` covers the fixed header, remaining-length bytes, packet id and
    properties length.
    """
    return max_packet_size - len(topic.encode()) - 2 - overhead


def message_digest(blob: bytes | memoryview) -> bytes:
    return hashlib.sha256(blob).digest()[:16]  # SHA-256: hardware-accelerated, see envelope.digest


def split(
    blob: bytes | memoryview, msg_id: str, max_chunk: int = DEFAULT_MAX_CHUNK, *, digest: bool = True
) -> list[bytes]:
    """Chunks of at most ``max_chunk`` bytes each, header included.

    ``digest=False`` leaves the digest field zero, for a receiver that does not check it because the
    message authenticates itself whole (an intake worker's AES-GCM forward: one SHA-256 pass less).
    """
    validate_site_id(msg_id, "message id")
    hs = header_size(msg_id)
    if max_chunk <= hs + 16:
        raise ValueError(f"max_chunk {max_chunk} leaves no room after the {hs}-byte chunk header")
    view = memoryview(blob)
    step = max_chunk - hs
    count = max(1, -(-len(view) // step))
    if count > MAX_CHUNKS:
        raise ValueError(f"message of {len(view)} bytes needs {count} chunks, more than {MAX_CHUNKS}")
    dig = message_digest(view) if digest else bytes(16)
    head = MAGIC + bytes([len(msg_id)]) + msg_id.encode("ascii")
    # one copy of each slice (join reads the memoryview in place), not a slice copy and then a concatenation
    return [
        b"".join((head, _TAIL.pack(i, count, len(view), dig), view[i * step : (i + 1) * step])) for i in range(count)
    ]


def split_plain(blob: bytes | memoryview, max_chunk: int = DEFAULT_MAX_CHUNK) -> list[bytes] | None:
    """Slices of at most ``max_chunk`` bytes with no chunk header (53 bytes less per message), or None when
    one would begin with :data:`MAGIC` (a reader would take it for a chunk: one message in 2^32).

    Only for a message whose receiver needs nothing from a header: it learns the count from the signed
    manifest, the index from the topic, and checks the joined message whole (the federation key's MAC, then
    the manifest's hash). That is an int8 step (``model/<v>/delta/<i>``), which only an agent's (or a plant
    uplink's) ``edge.follow.WeightsCollector`` reads; every agent since 29 Nov 2026 joins plain slices.
    """
    view = memoryview(blob)
    pieces = [bytes(view[i : i + max_chunk]) for i in range(0, len(view), max_chunk)] or [b""]
    return None if any(p[:4] == MAGIC for p in pieces) else pieces


@dataclass(frozen=True)
class Chunk:
    msg_id: str
    index: int
    count: int
    total: int
    digest: bytes
    payload: bytes | memoryview  # a view into the chunk when it came as (immutable) bytes: no copy


def parse_chunk(raw: bytes | memoryview) -> Chunk:
    """Decode one chunk's header; :class:`ChunkError` for anything malformed."""
    view = memoryview(raw)
    if len(view) < 5 or bytes(view[:4]) != MAGIC:
        raise ChunkError("not a fedline chunk (no FLC1 magic)")
    n = view[4]
    if len(view) < 5 + n + _TAIL.size:
        raise ChunkError("chunk header is truncated")
    try:
        msg_id = validate_site_id(bytes(view[5 : 5 + n]).decode("ascii"), "message id")
    except (UnicodeDecodeError, TopicError) as exc:
        raise ChunkError(f"bad message id in chunk: {exc}") from None
    index, count, total, dig = _TAIL.unpack_from(view, 5 + n)
    if count == 0 or count > MAX_CHUNKS or index >= count:
        raise ChunkError(f"chunk {index} of {count} is impossible")
    # the payload is joined into the whole message once it completes: a view into immutable bytes spares a
    # copy of every chunk (a mutable buffer the caller may reuse is copied)
    payload = view[5 + n + _TAIL.size :] if isinstance(raw, bytes) else bytes(view[5 + n + _TAIL.size :])
    if len(payload) > total:
        raise ChunkError(f"chunk payload {len(payload)} bytes exceeds message size {total}")
    return Chunk(msg_id, index, count, total, dig, payload)


@dataclass
class _Partial:
    count: int
    total: int
    digest: bytes
    first_seen: float
    parts: dict[int, bytes | memoryview] = field(default_factory=dict)
    held: int = 0


@dataclass
class ReassemblyStats:
    completed: int = 0
    duplicates: int = 0
    expired: int = 0  # incomplete messages forgotten after the timeout
    evicted: int = 0  # incomplete messages forgotten to stay under max_bytes
    malformed: int = 0  # chunks that could not be parsed or contradicted their message
    corrupt: int = 0  # messages whose reassembled digest did not match


class Reassembler:
    """Collects chunks of many messages at once; yields each message once, when complete.

    ``max_bytes`` caps the payload bytes held for incomplete messages: when a
    new chunk would exceed it, the oldest incomplete messages are evicted (and
    counted). A message larger than ``max_bytes`` is refused outright.
    Recently completed ids are remembered so late duplicates are not rebuilt.
    """

    def __init__(
        self,
        timeout_s: float = 300.0,
        max_bytes: int = 256 * 1024 * 1024,
        remember_completed: int = 4096,
        clock: Callable[[], float] = time.monotonic,
        check_digest: bool = True,
    ) -> None:
        self.timeout_s = timeout_s
        # False only where the message authenticates itself end to end (an AEAD forward, aggregator.forward):
        # a wrong byte fails there anyway, and the digest is a SHA-256 pass over the whole message
        self.check_digest = check_digest
        self.max_bytes = max_bytes
        self._clock = clock
        self._partial: OrderedDict[str, _Partial] = OrderedDict()
        self._done: OrderedDict[str, None] = OrderedDict()
        self._remember = remember_completed
        self.held_bytes = 0
        self.stats = ReassemblyStats()

    def __len__(self) -> int:
        return len(self._partial)

    def _drop(self, msg_id: str) -> None:
        p = self._partial.pop(msg_id)
        self.held_bytes -= p.held

    def evict_oldest(self) -> int:
        """Forget the oldest incomplete message (counted as evicted); returns the bytes freed (0: none held)."""
        if not self._partial:
            return 0
        msg_id = next(iter(self._partial))
        freed = self._partial[msg_id].held
        self._drop(msg_id)
        self.stats.evicted += 1
        return freed

    def expire(self) -> int:
        """Forget incomplete messages older than the timeout; return how many."""
        now = self._clock()
        old = [m for m, p in self._partial.items() if now - p.first_seen > self.timeout_s]
        for m in old:
            self._drop(m)
        self.stats.expired += len(old)
        return len(old)

    def add(self, raw: bytes | memoryview) -> tuple[str, bytes] | None:
        """Feed one chunk. Returns ``(msg_id, message)`` when it completes a message.

        Raises :class:`ChunkError` for a malformed chunk or one that contradicts
        earlier chunks of its message (counted in ``stats.malformed``).
        """
        self.expire()
        try:
            c = parse_chunk(raw)
        except ChunkError:
            self.stats.malformed += 1
            raise
        if c.msg_id in self._done:
            self.stats.duplicates += 1
            return None
        if c.total > self.max_bytes:
            self.stats.malformed += 1
            raise ChunkError(f"message {c.msg_id} of {c.total} bytes exceeds the reassembly cap {self.max_bytes}")
        p = self._partial.get(c.msg_id)
        if p is None:
            p = self._partial[c.msg_id] = _Partial(c.count, c.total, c.digest, self._clock())
        elif (p.count, p.total, p.digest) != (c.count, c.total, c.digest):
            self.stats.malformed += 1
            raise ChunkError(f"chunk {c.index} of {c.msg_id} disagrees with earlier chunks on size or digest")
        if c.index in p.parts:
            self.stats.duplicates += 1
            return None
        if p.held + len(c.payload) > p.total:  # else one message could hold count x total bytes
            self.stats.malformed += 1
            raise ChunkError(f"chunk {c.index} of {c.msg_id} would exceed the declared size {p.total}")
        while self.held_bytes + len(c.payload) > self.max_bytes and len(self._partial) > 1:
            victim = next(m for m in self._partial if m != c.msg_id)
            self._drop(victim)
            self.stats.evicted += 1
        p.parts[c.index] = c.payload
        p.held += len(c.payload)
        self.held_bytes += len(c.payload)
        if len(p.parts) < p.count:
            return None
        self._drop(c.msg_id)
        blob = b"".join(p.parts[i] for i in range(p.count))
        if len(blob) != p.total or (self.check_digest and message_digest(blob) != p.digest):
            self.stats.corrupt += 1  # not remembered as done: a clean resend of this id must get through
            raise ChunkError(f"message {c.msg_id} reassembled to {len(blob)} bytes with a wrong digest")
        self._done[c.msg_id] = None
        if len(self._done) > self._remember:
            self._done.popitem(last=False)
        self.stats.completed += 1
        return c.msg_id, blob
