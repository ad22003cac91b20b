"""The edge agent's status task: a retained status message when its content changes, and every
``status_interval_s`` (the heartbeat).

Why it carries so little: the broker operator and every other site can read it, so it holds no plant data (no
rows, losses or accuracy: ``edge.status_doc``); the plant's own figures are on /metrics and in the logs, which
stay at the site. The last will publishes ``offline`` when the connection is lost; a clean stop says so itself.

When it is sent (:class:`StatusSchedule`): at once on every (re)connect (the aggregator's catch-up reads it
there, and the will may have replaced the retained one) and on a change of what the aggregator and an operator
act on (state, version, key epoch, publishing state, a refused model, the privacy parameters, the outbox
depth growing past one waiting update); a change of ε spent or an outbox depth of 0 or 1 (an update out
and its receipt back: every round does that) goes with the next status, at the latest ``SOFT_DELAY_S``
later; a status whose content did not change is not sent again before the heartbeat. Before, every round
and receipt sent one (three or four per version per site, most of them repeating the one before: 4 % of the
chain's logical payload in ``bench/e2e.py``, 7 % with int8 updates).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from broker_bridge.binhead import pack_status
from broker_bridge.client import MqttClient, will_message
from broker_bridge.errors import NotConnected, PublishRefused
from edge.site_state import SiteState, wait_event
from edge.status_doc import build_status
from fedline.logs import event

log = logging.getLogger("fedline.edge")

COALESCE_S = 0.2  # a burst of changes is one status message
SOFT_DELAY_S = 2.0  # a change of ε or of a 0/1 outbox depth alone waits at most this long for the next status
#: fields whose change alone does not send a status at once (ε moves every round; the outbox holds 0 or 1 update
#: in normal work); ``ts`` changes every time and never counts as a change
SOFT_FIELDS = ("epsilon", "outbox_depth")


def _hard(doc: dict[str, Any]) -> dict[str, Any]:
    """What must be sent at once when it changes: all but the soft fields and ``ts``, and the outbox depth's
    bucket (0-1, 2-3, 4-7, ...: a backlog that grows or clears shows at once, the normal 0/1 does not)."""
    out = {k: v for k, v in doc.items() if k not in SOFT_FIELDS and k != "ts"}
    depth = doc.get("outbox_depth", 0)
    out["outbox_backlog"] = 0 if depth <= 1 else int(depth).bit_length()
    return out


class StatusSchedule:
    """When the next status goes out (pure: no I/O, a clock to inject), see the module docstring."""

    def __init__(self, heartbeat_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.heartbeat_s = heartbeat_s
        self.clock = clock
        self.last: dict[str, Any] | None = None  # the last status sent (None: send the next one at once)
        self.last_at = float("-inf")
        self.soft_since: float | None = None  # when a soft field first differed from the last status sent

    def reset(self) -> None:
        """A (re)connect: the next status goes out at once whatever it holds."""
        self.last, self.soft_since = None, None

    def wait_s(self, doc: dict[str, Any]) -> float:
        """Seconds until ``doc`` (the status now) should be sent: 0 to send it now."""
        now = self.clock()
        if self.last is None or _hard(doc) != _hard(self.last):
            return 0.0
        heartbeat = self.last_at + self.heartbeat_s - now
        if all(doc.get(k) == self.last.get(k) for k in SOFT_FIELDS):
            self.soft_since = None
            return max(heartbeat, 0.0)
        if self.soft_since is None:
            self.soft_since = now
        return max(min(self.soft_since + SOFT_DELAY_S - now, heartbeat), 0.0)

    def sent(self, doc: dict[str, Any]) -> None:
        self.last, self.last_at, self.soft_since = doc, self.clock(), None


class StatusPublisher:
    """Builds and publishes the site's status document; also the start-up announcement in the logs."""

    def __init__(self, state: SiteState) -> None:
        self.state = state
        self.schedule = StatusSchedule(state.cfg.status_interval_s)

    def privacy_status(self) -> dict[str, Any]:
        """Public privacy parameters for the status message (no plant data: no row counts)."""
        st = self.state
        if st.ledger is None:
            return {"privacy": "off"}
        g = st.ledger.group
        return {
            "privacy": "on",
            "accounting": "per_record",
            "epsilon": round(st.epsilon, 6),
            "epsilon_budget": st.dp.epsilon if st.dp else None,
            "delta": st.dp.delta if st.dp else None,
            "privacy_unit": "row" if g == 1 else f"raw sample (in {g} overlapping windows, group-accounted)",
        }

    def status(self, state: str = "online") -> dict[str, Any]:
        """The retained status document (also what ``fedline status`` shows): see ``edge.status_doc``.

        Which model the site serves (``personaliser.choice``) is left out: it is chosen on the site's
        held-out rows, so it is plant data; it is in the model directory's pointer and the logs.
        """
        st = self.state
        depth, _ = st.outbox.depth()
        return build_status(
            state=state,
            version=st.base.version,
            privacy=self.privacy_status(),
            publishing=st.publishing,
            outbox_depth=depth,
            epoch=max(st.keyring, default=-1),
            model_refused=st.model_refused,
            # weights and int8 steps with the tensor table by reference (broker_bridge.layouts); binary receipts;
            # the manifest's spec by its hash; binary manifests (FLM version 3); compact binary receipts
            reads=("FLT2", "FLR2", "FLM2", "FLM3", "FLR3"),
        )

    def will(self) -> Any:
        """The last will: ``offline`` on this site's status topic when the broker loses the connection."""
        st = self.state
        payload = json.dumps({"state": "offline", "reason": "connection lost"}).encode()
        return will_message(st.topics.status(st.site), payload)

    async def publish(
        self, client: MqttClient, state: str = "online", timeout: float | None = None, doc: dict[str, Any] | None = None
    ) -> None:
        """Publish the status now (retained): ``doc``, or the status as it is now.

        In binary (``FLH1``, ``broker_bridge.binhead.pack_status``: about 90 bytes where the JSON took 250) when
        the manifest of the version in use says the aggregator reads it (its observer, shipped with it, reads
        it too); JSON otherwise (an older aggregator, or no manifest yet: the first status after a start)."""
        self.state.refresh_gauges()
        doc = doc or self.status(state)
        reads = self.state.base.manifest.get("reads") if self.state.base.manifest else None
        binary = pack_status(doc) if isinstance(reads, list) and "FLH1" in reads else None
        payload = binary or json.dumps(doc, separators=(",", ":")).encode()
        await client.publish(self.state.topics.status(self.state.site), payload, qos=1, retain=True, timeout=timeout)

    def reconnected(self) -> None:
        """The connection is (re)made: the next status goes out at once (catch-up, and the will's ``offline``)."""
        self.schedule.reset()
        self.state.status_dirty.set()

    async def loop(self, client: MqttClient) -> None:
        """Publish when the content changes (:class:`StatusSchedule`) and every ``status_interval_s`` while connected."""
        st = self.state
        while True:
            if not client.connected.is_set():
                await client.connected.wait()
            st.status_dirty.clear()
            doc = self.status()
            wait = self.schedule.wait_s(doc)
            if wait > 0:
                await wait_event(st.status_dirty, wait)
                continue
            try:
                await self.publish(client, doc=doc)
            except (NotConnected, PublishRefused) as exc:  # tried again on the next change or heartbeat
                event(log, "status.not_published", logging.DEBUG, site=st.site, error=str(exc))
                await wait_event(st.status_dirty, st.cfg.status_interval_s)
                continue
            self.schedule.sent(doc)
            await asyncio.sleep(COALESCE_S)  # coalesce bursts of changes

    def announce(self) -> None:
        """The start-up event, and a warning when privacy is off or rounds depend on row counts."""
        st = self.state
        event(
            log,
            "edge.starting",
            site=st.site,
            federation=st.cfg.federation,
            model=st.spec.kind,
            version=st.base.version,
            rows=len(st.dataset),
            outbox=st.outbox.depth()[0],
            counter=st.outbox.last_counter(),
            epsilon=round(st.epsilon, 4),
        )
        if st.dp is None:
            event(
                log,
                "privacy.off",
                logging.WARNING,
                site=st.site,
                detail='privacy = "off": updates carry NO differential privacy guarantee for the plant\'s records',
            )
        elif st.cfg.training.every_rows or st.cfg.training.max_train_rows:
            event(
                log,
                "privacy.count_schedule",
                logging.WARNING,
                site=st.site,
                detail="training.every_rows / max_train_rows make rounds or their rows depend on row counts; the "
                "per-record guarantee's argument assumes rounds by time or version (docs/architecture.md)",
            )
