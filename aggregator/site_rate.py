"""FedAsync's per-site rate limit: sending faster does not buy a site more influence (issue 14).

Why: under FedAsync every update becomes a version with mixing weight
``α_t = α f(s)``. A site that sends ten times as often as the others would
move the model ten times as much. Papaya (Huba et al., MLSys 2022) limits
each client's participation in asynchronous FL; here the limit is on
influence per unit of time: a site's ``α_t`` is multiplied by
``r = min(1, Δt / site_interval_s)``, ``Δt`` the seconds since its last
applied update (``r = 1`` for its first). A site sending every
``site_interval_s`` or slower is unaffected; one sending every
``site_interval_s / 10`` gets ``α/10`` per update, so over any interval its
updates add up to about one full-weight update. Nothing is refused (a
refusal would waste the privacy the site spent); the receipt's ``weight``
and the version's lineage (``rate``) show the scaled coefficient.

Times are the aggregator's monotonic clock while it runs. Across a restart
the state is each site's newest ``applied`` verdict in the store: its
``decided_at`` (wall clock) is written in the very transaction that commits the
version containing the update (``Store.commit_version``), so the rate's state
can never disagree with the model's (a crash before the commit loses both,
after it keeps both). At start, :meth:`SiteRate.restore` turns the wall-clock
age of each site's last applied update into the monotonic clock's terms; a
restart therefore gives no site a fresh full-weight update. A wall clock that
stepped back past a site's last update counts as no time elapsed (the
conservative side: that site's next update waits out its interval as if it had
just sent).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping


class SiteRate:
    """Per-site scale of FedAsync's mixing weight (``site_interval_s`` 0: off)."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}

    def scale(self, site: str) -> float:
        """``min(1, Δt / interval)``: 1 for a site's first update or when the limit is off."""
        last = self._last.get(site)
        if self.interval_s <= 0 or last is None:
            return 1.0
        return min(1.0, max(0.0, self.clock() - last) / self.interval_s)

    def applied(self, site: str) -> None:
        self._last[site] = self.clock()

    def restore(self, last_applied: Mapping[str, float], wall_now: float) -> None:
        """Seed from the store: each site's last applied update at wall-clock time ``last_applied[site]``."""
        now = self.clock()
        for site, at in last_applied.items():
            self._last[site] = now - max(0.0, wall_now - at)
