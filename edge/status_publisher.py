"""The edge agent's status task: a retained status message on every change and every ``status_interval_s``.

Why it carries so little: the broker operator and every other site can read it, so it holds no plant data (no
rows, losses or accuracy: ``edge.status_doc``); the plant's own figures are on /metrics and in the logs, which
stay at the site. The last will publishes ``offline`` when the connection is lost; a clean stop says so itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from broker_bridge.client import MqttClient, will_message
from broker_bridge.errors import NotConnected, PublishRefused
from edge.site_state import SiteState, wait_event
from edge.status_doc import build_status
from fedline.logs import event

log = logging.getLogger("fedline.edge")

COALESCE_S = 0.2  # a burst of changes is one status message


class StatusPublisher:
    """Builds and publishes the site's status document; also the start-up announcement in the logs."""

    def __init__(self, state: SiteState) -> None:
        self.state = state

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
        )

    def will(self) -> Any:
        """The last will: ``offline`` on this site's status topic when the broker loses the connection."""
        st = self.state
        payload = json.dumps({"state": "offline", "reason": "connection lost"}).encode()
        return will_message(st.topics.status(st.site), payload)

    async def publish(self, client: MqttClient, state: str = "online", timeout: float | None = None) -> None:
        """Publish the status now (retained)."""
        self.state.refresh_gauges()
        payload = json.dumps(self.status(state)).encode()
        await client.publish(self.state.topics.status(self.state.site), payload, qos=1, retain=True, timeout=timeout)

    async def loop(self, client: MqttClient) -> None:
        """Publish on every change (coalesced) and at least every ``status_interval_s`` while connected."""
        st = self.state
        while True:
            await wait_event(st.status_dirty, st.cfg.status_interval_s)
            st.status_dirty.clear()
            if not client.connected.is_set():
                await client.connected.wait()
            try:
                await self.publish(client)
            except (NotConnected, PublishRefused) as exc:
                event(log, "status.not_published", logging.DEBUG, site=st.site, error=str(exc))
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
