"""The edge agent's side of secure aggregation on the wire: cohort announcements, survivors and unmask requests.

Why apart from ``edge.secagg_member`` (the protocol state): this is the glue to the running agent. A cohort on a
new base is a reason to train (with ``on_new_model``, whichever of the cohort and the version arrives last starts
the round); survivors and requests get a sealed reply, and a member away when it should reply is a dropout the
cohort tolerates, so a failed reply is counted and logged, not retried. Replies go through a
``broker_bridge.publish_window.PublishWindow``: in order, without the receive loop awaiting each acknowledgement.
"""

from __future__ import annotations

import logging

from broker_bridge.publish_window import PublishWindow
from edge.site_state import SiteState
from fedline.logs import event

log = logging.getLogger("fedline.edge")


class CohortLink:
    """Routes one ``secagg_*`` message to the site's cohort state and publishes its reply."""

    def __init__(self, state: SiteState) -> None:
        self.state = state
        # replies leave in order without the receive loop awaiting each acknowledgement: the receipts, grants and
        # model chunks behind a cohort message are not held up by a broker round trip
        self.window = PublishWindow(on_failure=self._unsent)

    def _unsent(self, topic: str, what: str, exc: BaseException) -> None:
        """A reply the broker never acknowledged: a member away now is a dropout the cohort tolerates."""
        self.state.metrics.secagg_replies_unsent.inc()
        event(log, "secagg.reply_unsent", logging.WARNING, site=self.state.site, what=what, error=str(exc))

    async def on_message(self, kind: str, payload: bytes, cohort: str | None = None) -> None:
        """Cohort announcements start a round; survivors and requests get a sealed reply."""
        st = self.state
        assert st.cohorts is not None
        joined, reply = st.cohorts.route(kind, payload, cohort)
        if joined:
            # a cohort is on a new base version: with on_new_model it is a reason to train, as a new
            # version is (whichever of the two arrives last starts the round); else only new rows are
            st.rebased = st.rebased or st.cfg.training.on_new_model
            st.wake_train.set()
        if reply is not None and st.client is not None:
            await self.window.publish(st.client, st.topics.secagg_reply(st.site), reply, what=f"{kind} reply")
