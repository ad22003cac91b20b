"""The demo's watch phase: follow the federation, cut one site off for a while, and decide when to stop.

Why its own module: the cut schedule (when to cut the intermittent site,
when to restore it, what "settled" means for the report's ledger) is the
demo's one scripted fault, and the stop rule (target version reached with the
site settled, every budget spent, or the timeout) is what the report's
figures depend on; both read the observer's view only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedline.launch import Launcher

if TYPE_CHECKING:
    from fedline.demo.runner import DemoOptions

log = logging.getLogger("fedline.demo")
CUT_WAIT_S = 30.0  # the longest a cut lasts beyond cut_s while no version is made without the site


class CutSchedule:
    """Cut ``site``'s proxy after version ``after``; restore it ``cut_s`` later, once a version was made without it.

    ``state`` is what the report reads: ``cut``, ``cut_at``, ``restored_at`` (seconds from the start),
    the version and counter at the cut and at the restore, and ``settled`` (the site's ledger then).
    """

    def __init__(self, opts: DemoOptions, proxies: dict[str, Any], site: str, state: dict[str, Any]) -> None:
        self.opts, self.proxy, self.site, self.state = opts, proxies[site], site, state

    def step(self, view: Any, elapsed: float) -> None:
        s, opts = self.state, self.opts
        if not s["cut"] and s["cut_at"] is None and view.version >= opts.cut_after_version:
            self.proxy.cut()
            s.update(
                cut=True,
                cut_at=round(elapsed, 1),
                version_at_cut=view.version,
                counter_at_cut=view.sites[self.site].updates_sent,
            )
        away = elapsed - s["cut_at"] if s["cut"] else 0.0
        # restore after cut_s once the others made a version without the site (the point of the cut; a busy
        # machine can make the observer see it late), or after CUT_WAIT_S more at most
        if s["cut"] and away >= opts.cut_s and (view.version > s["version_at_cut"] or away >= opts.cut_s + CUT_WAIT_S):
            self.proxy.restore()
            s.update(
                cut=False,
                restored_at=round(elapsed, 1),
                version_at_restore=view.version,
                online_statuses_at_restore=view.sites[self.site].online_statuses,
            )

    def settled(self, view: Any) -> bool:
        """Restored, back online, and every update the site sent has its final verdict (recorded for the report).

        "Back online" is a status saying "online" published after the restore (the reconnect sends one at once):
        without it a site cut just after sealing an update looked settled from the figures it published before the
        cut, and a short run could end before it reconnected, reporting its ε as 0 (ε waits up to 2 s to be
        published, edge/status_publisher.py, and the cut came first)."""
        if self.state["restored_at"] is None or not settled(view, self.site):
            return False
        if view.sites[self.site].online_statuses <= self.state["online_statuses_at_restore"]:
            return False
        # what the report accounts for: an update sealed after this (sites train on every new version) stays
        # safely in that site's outbox when the demo stops
        sv = view.sites[self.site]
        self.state["settled"] = {
            "counter": sv.updates_sent,
            "verdicts": {c: dict(r) for c, r in sv.verdicts.items() if r.get("msg_id") in sv.update_ids},
            "outbox_depth": sv.status.get("outbox_depth"),
        }
        return True


def _check_alive(procs: Launcher) -> None:
    from broker_bridge.errors import FedlineError
    from fedline.demo.runner import _tail

    dead = [p for p in procs.dead() if not p.name.startswith("plc-")]
    if dead:
        p = dead[0]
        raise FedlineError(
            f"{p.name} exited with {p.popen.returncode}; last lines of {p.log_path}:\n" + _tail(p.log_path)
        )


def _done(view: Any, target: int, settled_now: bool) -> bool:
    """The target version with the cut site settled; or every budget spent (nothing more will come)."""
    if view.version >= target and settled_now:
        return True
    spent = [sv.status.get("publishing") == "budget_exhausted" for sv in view.sites.values()]
    if settled_now and all(spent) and view.version >= 1:
        log.warning("every site has spent its privacy budget at version %d: stopping", view.version)
        return True
    return False


async def watch(
    opts: DemoOptions,
    monitor: Any,
    procs: Launcher,
    cut: CutSchedule,
    console: Any,
    table: Callable[..., Any],
    metric: str,
    on_version: Callable[[int], None] | None = None,
) -> None:
    """Run until the target version is reached and the intermittent site is settled, or the timeout."""
    view = monitor.view
    started = time.monotonic()
    live = None
    if console is not None and opts.progress:
        from rich.live import Live

        live = Live(table(view, metric, cut.site, False), console=console, refresh_per_second=2, transient=False)
        live.start()
    try:
        while True:
            await asyncio.sleep(0.5)
            _check_alive(procs)
            if on_version is not None:
                on_version(view.version)
            elapsed = time.monotonic() - started
            cut.step(view, elapsed)
            if live is not None:
                live.update(table(view, metric, cut.site, cut.state["cut"]))
            if elapsed > opts.timeout_s:
                log.warning("demo timeout after %.0f s at version %d", elapsed, view.version)
                break
            if _done(view, opts.tuning.versions, cut.settled(view)):
                break
    finally:
        if live is not None:
            live.stop()
            console.print()


def settled(view: Any, site: str) -> bool:
    """The site's outbox is empty and every update it sent has a final verdict."""
    sv = view.sites[site]
    sent = sv.updates_sent  # update ids are random: count the ids seen on the wire
    if sent == 0 or sv.status.get("outbox_depth", 1) != 0:
        return False
    final = [
        r
        for r in sv.verdicts.values()
        if r.get("msg_id") in sv.update_ids and r.get("verdict") in ("applied", "stale", "rejected", "buffered")
    ]
    return len(final) >= sent
