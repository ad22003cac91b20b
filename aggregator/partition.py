"""Which intake worker reads which site: rendezvous (highest random weight) hashing over the live workers.

Why rendezvous hashing: every worker computes the same owner for a site from
the same two lists (enrolled sites, live workers) without talking to the
others, a site's whole update (all its chunks) goes to one worker, and when a
worker dies only its own sites move (each to the survivor that scores next
highest), so nobody else's half-received update is cut.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def score(worker: str, site: str) -> int:
    """The weight of ``site`` on ``worker``: the first 8 bytes of BLAKE2b(worker \\0 site), big-endian."""
    return int.from_bytes(hashlib.blake2b(f"{worker}\0{site}".encode(), digest_size=8).digest(), "big")


def owner(site: str, workers: Iterable[str]) -> str | None:
    """The worker that reads ``site`` (None when no worker is live); ties go to the smaller id."""
    best: tuple[int, str] | None = None
    for w in workers:
        key = (score(w, site), w)
        if best is None or key[0] > best[0] or (key[0] == best[0] and w < best[1]):
            best = key
    return best[1] if best is not None else None


def share(sites: Iterable[str], workers: Iterable[str], me: str) -> set[str]:
    """The sites ``me`` reads when ``workers`` are live (``me`` counts as live)."""
    live = sorted(set(workers) | {me})
    return {s for s in sites if owner(s, live) == me}
