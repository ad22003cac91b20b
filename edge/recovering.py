"""The edge agent's recovery task: a site with an empty state asks the aggregator what it accepted, until answered.

Why: a new or lost data directory knows neither the last counter nor the ε already spent; training or sending
before the aggregator's answer (``edge.recovery``) could reuse a counter or under-count the privacy cost. A
request sent before the aggregator subscribed is lost, so it is sent again after 0.5 s, 1 s, 2 s ... up to
``resend_s``.
"""

from __future__ import annotations

import asyncio
import logging

from broker_bridge.client import MqttClient
from broker_bridge.errors import NotConnected, PublishRefused, WireError
from edge.site_state import SiteState
from fedline.logs import event

log = logging.getLogger("fedline.edge")


class RecoveryTask:
    """Asks (:meth:`loop`) and applies the answer (:meth:`on_answer`); idle once the state is recovered."""

    def __init__(self, state: SiteState) -> None:
        self.state = state

    async def loop(self, client: MqttClient) -> None:
        """Ask the aggregator what it accepted from this site until it answers (edge.recovery)."""
        st = self.state
        wait = 0.5
        while (recovery := st.recovery) is not None:
            await client.connected.wait()
            try:
                # the answer can arrive (and clear st.recovery) while this publish awaits its PUBACK
                await client.publish(st.topics.recovery_request(st.site), recovery.request(), qos=1)
                event(log, "recovery.asked", site=st.site, attempt=recovery.asked)
            except (NotConnected, PublishRefused) as exc:
                event(log, "recovery.not_asked", logging.WARNING, site=st.site, error=str(exc))
            await asyncio.sleep(wait)
            wait = min(2 * wait, st.cfg.recovery.resend_s)

    def on_answer(self, payload: bytes) -> None:
        """Restore the counter and the privacy ledger from the aggregator's signed answer, then train again."""
        st = self.state
        if st.recovery is None:
            return  # answered already (a duplicate answer)
        try:
            answer = st.recovery.open(payload)
        except WireError as exc:
            st.metrics.malformed.labels("recovery").inc()
            event(log, "recovery.answer_refused", logging.WARNING, site=st.site, reason=str(exc))
            return
        st.recovery.apply(answer, st.outbox, st.dp, st.privacy_group())
        st.recovery = None
        st.ledger = st.open_ledger() if st.dp else None
        st.set_publishing("ok")
        st.wake_train.set()  # rows that arrived meanwhile may train now
