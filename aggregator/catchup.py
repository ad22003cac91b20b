"""Catch-up: a site that missed the retained state gets it again, on request.

fedline keeps the current state in retained messages: each site's sealed
federation key (``sites/<site>/fedkey``), the signed manifest and the model
chunks. On one Mosquitto that is enough: a site that connects gets them at
once. On a broker cluster it is not: RabbitMQ 3.10 keeps retained messages on
the node that took them, so a site connected to another node never sees
them, and other clustered brokers lose them on a failover.

So retained messages are only an optimisation. The request is the status
every edge already publishes on each (re)connect and every status period: it
names the global version the site uses and the key epoch it holds. When a
site is online and behind (an older version, or an older key epoch), the
aggregator publishes the current state again: that site's key grant and the
current release. A live publish reaches every subscriber on every node.

Not at once: a site that has just (re)connected publishes its status before the retained state
reaches it, so its first status often says "behind" (no key epoch yet, or the seed's version) and the
next one, a fraction of a second later, says it caught up. A claim is answered only once it has stood
for ``settle_s`` (2 s) and no later status from the site has withdrawn it: before, every start of a
federation republished the current release to every subscriber (in ``bench/e2e.py``, 1-3 extra copies
of version 0's weights, about 6 % of the chain's logical payload).

Who can abuse it: a site (or anyone with its broker credentials) can claim to
be behind as often as it likes. All answers are coalesced into one republish per
``min_interval_s`` (so each site is answered at most once per interval; a claim
made meanwhile waits for the next one), so a storm of claims costs one release
per interval, the same traffic as one new version. The answer carries nothing new: the same
ciphertext every member already may read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker_bridge.binhead import read_status

#: how long a claim of being behind must stand before it is answered (the retained state usually reaches a
#: site that has just connected well within it, and its next status withdraws the claim)
SETTLE_S = 2.0


def parse_status(payload: bytes) -> dict[str, Any] | None:
    """A site's status document (JSON or binary, ``binhead.read_status``), or None when it is not one (garbage
    is ignored, not answered)."""
    return read_status(payload)


@dataclass
class CatchUp:
    """Decides which sites to answer; :meth:`due` hands them out at most once per interval."""

    min_interval_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    settle_s: float = SETTLE_S
    _pending: dict[str, float] = field(default_factory=dict)  # site -> when it first said it was behind
    _last_batch: float = float("-inf")

    def on_status(self, site: str, doc: dict[str, Any], *, version: int, epoch: int) -> bool:
        """Take one status; True when the site is online and behind (it will be answered)."""
        if doc.get("state") != "online":
            return False
        site_version = doc.get("version")
        site_epoch = doc.get("epoch")
        behind_version = (
            isinstance(site_version, int) and not isinstance(site_version, bool) and (site_version < version)
        )
        behind_epoch = isinstance(site_epoch, int) and not isinstance(site_epoch, bool) and site_epoch < epoch
        if not (behind_version or behind_epoch):
            # caught up since it said it was behind (e.g. it was adopting the version just published): no
            # republish for it; each republish costs every subscriber the release again
            self._pending.pop(site, None)
            return False
        # the first claim counts (repeating it does not delay it); one made within the interval after an answer
        # waits for the next batch, it is not dropped: a site on a cluster node without the retained chunks
        # subscribes to the version the answer named and needs it once more, live (edge.adopt)
        self._pending.setdefault(site, self.clock())
        return True

    def due(self) -> list[str]:
        """The sites to answer now: claims that have stood ``settle_s``, at most one batch per interval."""
        now = self.clock()
        if now - self._last_batch < self.min_interval_s:
            return []
        batch = sorted(s for s, since in self._pending.items() if now - since >= self.settle_s)
        if not batch:
            return []
        for site in batch:
            del self._pending[site]
        self._last_batch = now
        return batch

    def wait_s(self) -> float:
        """How long the caller may sleep before :meth:`due` can hand out a site (``min_interval_s`` when
        nothing is pending; a new claim wakes the caller anyway)."""
        if not self._pending:
            return self.min_interval_s
        now = self.clock()
        settled = min(self._pending.values()) + self.settle_s
        return max(settled - now, self._last_batch + self.min_interval_s - now, 0.0)
