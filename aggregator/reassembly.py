"""Chunks in, whole sealed messages out: one reassembler per sender, every sender's held bytes capped.

Why here and not in the service: the single-process aggregator reassembles the
sites' updates, an intake worker (:mod:`aggregator.intake_worker`) the updates
of its share of the sites, and the reducer the workers' forwards. The same
rules hold for all three (per-sender reassembly, a cap per sender and over all
of them, quiet senders swept at most once a second).
"""

from __future__ import annotations

import logging
import time

from aggregator.config import AggregatorSection
from aggregator.metrics import Metrics
from broker_bridge.chunking import Reassembler
from broker_bridge.envelope import is_sealed_update
from broker_bridge.errors import ChunkError
from fedline.logs import event

log = logging.getLogger("fedline.aggregator")


def enforce_total_cap(reassemblers: dict[str, Reassembler], cap: int) -> list[str]:
    """Evict half-sent messages until all sites together hold at most ``cap`` bytes; returns the sites hit.

    Always from the site holding the most, oldest message first: a site flooding half-sent updates (or
    just the biggest sender) loses its own before anyone else's.
    """
    hit: list[str] = []
    if not reassemblers or len(reassemblers) * next(iter(reassemblers.values())).max_bytes <= cap:
        return hit  # every site has the same cap, and together they stay under this one: no sum per chunk
    total = sum(r.held_bytes for r in reassemblers.values())
    while total > cap:
        site, r = max(reassemblers.items(), key=lambda kv: kv[1].held_bytes)
        total -= r.evict_oldest()  # its oldest may hold 0 bytes (a refused first chunk): then the next
        hit.append(site)
    return hit


class SenderChunks:
    """Per-sender reassembly with the ``[aggregator]`` caps; :meth:`add` returns a completed message or None."""

    def __init__(self, a: AggregatorSection, metrics: Metrics, *, check_digest: bool = True) -> None:
        self.cfg = a
        self.metrics = metrics
        self.check_digest = check_digest  # False for the reducer's forwards: AES-GCM authenticates them whole
        # one reassembler per sender: message ids are chosen by senders, so a shared one would let one site's
        # chunks collide with (or be used to disturb) another's; each sender's held bytes are capped too
        self.reassemblers: dict[str, Reassembler] = {}
        # senders holding half-sent bytes, and when quiet senders' leftovers are next swept: with a thousand
        # sites, touching every reassembler per chunk or per update would cost more than opening the update
        self._holding: set[str] = set()
        self._next_sweep = 0.0

    def add(self, sender: str, topic: str, payload: bytes, msg_id: str | None = None) -> tuple[str, bytes] | None:
        """Feed one chunk from ``sender``; ``(msg_id, message)`` when it completes one (bad chunks: counted).

        ``msg_id``: the id an update topic names. A whole sealed update sent without the chunk header (FLC0,
        ``envelope.is_sealed_update``) is the message itself, under that id: nothing to reassemble, and nothing
        lost by the missing header (its digest guards reassembly; the sealed box and the signature inside
        authenticate the update whole, and the id inside the signed header is what the store keys on)."""
        if msg_id is not None and is_sealed_update(payload):
            if len(payload) > self.cfg.reassembly_max_bytes:
                self.metrics.chunk_errors.inc()
                event(
                    log, "chunk.rejected", level=logging.WARNING, site=sender, topic=topic, error="whole update too big"
                )
                return None
            return msg_id, payload
        reassembler = self.reassemblers.get(sender)
        if reassembler is None:
            a = self.cfg
            # remember_completed=0: a site resends a whole update when its receipt was lost; it must be
            # rebuilt and decided again (the store answers with the original verdict), not swallowed
            # as a duplicate of a message already completed
            reassembler = self.reassemblers[sender] = Reassembler(
                a.reassembly_timeout_s, a.reassembly_max_bytes, remember_completed=0, check_digest=self.check_digest
            )
        try:
            done = reassembler.add(payload)
        except ChunkError as exc:
            self.metrics.chunk_errors.inc()
            event(log, "chunk.rejected", level=logging.WARNING, site=sender, topic=topic, error=str(exc))
            return None
        if reassembler.held_bytes:
            self._holding.add(sender)
        else:
            self._holding.discard(sender)
        if done is None:
            holding = {s: self.reassemblers[s] for s in self._holding}  # the others hold 0 bytes
            evicted = enforce_total_cap(holding, self.cfg.reassembly_total_max_bytes)
            if evicted:
                self.metrics.reassembly_evicted.inc(len(evicted))
                event(
                    log,
                    "reassembly.evicted",
                    level=logging.WARNING,
                    sites=sorted(set(evicted)),
                    messages=len(evicted),
                    cap=self.cfg.reassembly_total_max_bytes,
                )
            return None
        now = time.monotonic()
        if now >= self._next_sweep:  # forget what senders that went quiet left half-sent
            self._next_sweep = now + 1.0
            for s in list(self._holding):
                self.reassemblers[s].expire()
                if not self.reassemblers[s].held_bytes:
                    self._holding.discard(s)
        return done

    def forget(self, sender: str) -> None:
        """Drop a sender's half-sent messages (an intake worker no longer reads that site)."""
        self.reassemblers.pop(sender, None)
        self._holding.discard(sender)
