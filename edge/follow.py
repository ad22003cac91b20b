"""Collect the (sealed) weights of the newest global model from its MQTT chunks.

Why buffering before the manifest: on subscribe, a broker delivers the
retained manifest and the retained chunks in no particular order, so chunks
of a version newer than ours are kept (bounded: a few versions, a byte cap)
until its manifest says how many to expect. Chunks may be fedline chunks
(``broker_bridge.chunking``, self-describing) or plain slices numbered by the
topic index; both are accepted. The joined blob is still encrypted under the federation
content key: the agent opens it, and checking the result is :mod:`edge.model_store`'s job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from broker_bridge.chunking import MAGIC as CHUNK_MAGIC
from broker_bridge.chunking import parse_chunk
from broker_bridge.errors import ChunkError


@dataclass
class _Parts:
    first_seen: float = field(default_factory=time.monotonic)
    slices: dict[int, bytes] = field(default_factory=dict)
    held: int = 0


class WeightsCollector:
    """Chunks of model weights by version; :meth:`complete` joins them when all are there."""

    def __init__(self, max_versions: int = 3, max_bytes: int = 256 * 1024 * 1024, timeout_s: float = 600.0) -> None:
        self.max_versions = max_versions
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._parts: dict[int, _Parts] = {}
        self.malformed = 0

    def held_bytes(self) -> int:
        return sum(p.held for p in self._parts.values())

    def forget_below(self, version: int) -> None:
        """Drop chunks of versions older than ``version`` (superseded before they completed)."""
        for v in [v for v in self._parts if v < version]:
            del self._parts[v]

    def add(self, version: int, index: int, payload: bytes) -> None:
        """Keep one chunk (raw slice, or a fedline chunk whose own index wins)."""
        now = time.monotonic()
        for v in [v for v, p in self._parts.items() if now - p.first_seen > self.timeout_s]:
            del self._parts[v]
        if payload[:4] == CHUNK_MAGIC:
            try:
                c = parse_chunk(payload)
            except ChunkError:
                self.malformed += 1
                raise
            index, data = c.index, payload  # keep whole chunks; joined by parse order later
        else:
            data = payload
        p = self._parts.setdefault(version, _Parts())
        if index in p.slices:
            return
        while len(self._parts) > self.max_versions or self.held_bytes() + len(data) > self.max_bytes:
            oldest = min(v for v in self._parts if v != version) if len(self._parts) > 1 else None
            if oldest is None:
                raise ChunkError(f"model version {version} exceeds the {self.max_bytes}-byte reassembly cap")
            del self._parts[oldest]
        p.slices[index] = data
        p.held += len(data)

    def complete(self, version: int, chunks: int) -> bytes | None:
        """The joined weights blob when all ``chunks`` pieces of ``version`` are here, else None."""
        p = self._parts.get(version)
        if p is None or any(i not in p.slices for i in range(chunks)):
            return None
        pieces = [p.slices[i] for i in range(chunks)]
        if pieces and pieces[0][:4] == CHUNK_MAGIC:
            blob = b"".join(parse_chunk(x).payload for x in pieces)
        else:
            blob = b"".join(pieces)
        del self._parts[version]
        return blob
