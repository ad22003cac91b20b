"""The edge agent's sender task: publish queued updates in counter order, and settle them on signed receipts.

Why receipts live with the sender: an update leaves the outbox only on the aggregator's signed receipt, and
the receipt is what lets the next update go out (``max_in_flight``) and, under ``stop_training``, a round start
again; sending and settling are one store-and-forward protocol over the outbox.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from typing import Any

from broker_bridge.chunking import split
from broker_bridge.client import MqttClient
from broker_bridge.envelope import is_sealed_update, open_receipt
from broker_bridge.errors import NotConnected, PublishRefused, WireError
from edge.site_state import SiteState, wait_event
from fedline.logs import event

log = logging.getLogger("fedline.edge")


class Sender:
    """Publishes the outbox while connected; :meth:`on_receipt` settles what the aggregator answered."""

    def __init__(self, state: SiteState) -> None:
        self.state = state

    async def loop(self, client: MqttClient) -> None:
        """Publish queued updates in counter order, at most ``max_in_flight`` without a receipt."""
        st = self.state
        resend, window = st.cfg.outbox.resend_after_s, st.cfg.outbox.max_in_flight
        while True:
            await client.connected.wait()
            in_flight = 0
            now = time.time()
            for row in st.outbox.rows():
                if row.sent_at is not None and row.sent_at >= now - resend:
                    in_flight += 1  # waiting for its receipt
                    continue
                if in_flight >= window:
                    break
                if not await self.publish_row(client, row):
                    break
                in_flight += 1
            st.wake_send.clear()
            await wait_event(st.wake_send, min(resend, 5.0))

    async def publish_row(self, client: MqttClient, row: Any) -> bool:
        """Publish all chunks of one update and mark it sent; False when it could not go out now."""
        st = self.state
        topic0 = st.topics.update_chunk(st.site, row.msg_id, 0)
        limit = client.chunk_limit(topic0)
        reads = st.base.manifest.get("reads")
        # in one message without the chunk header (53 bytes) when the aggregator reads it (FLC0) and it fits: a
        # sealed update is recognised by its own magic, and authenticates itself whole; its id is in the topic
        whole = isinstance(reads, list) and "FLC0" in reads and is_sealed_update(row.blob) and len(row.blob) <= limit
        chunks = [bytes(row.blob)] if whole else split(row.blob, row.msg_id, limit)
        items = [(st.topics.update_chunk(st.site, row.msg_id, i), c) for i, c in enumerate(chunks)]
        try:
            await client.publish_many(items, qos=1)
        except NotConnected:
            return False  # back to waiting for the connection; the row stays queued
        except PublishRefused as exc:
            st.error(f"broker refused update {row.msg_id}: {exc}")
            event(
                log,
                "update.refused_by_broker",
                logging.ERROR,
                site=st.site,
                msg_id=row.msg_id,
                reason=exc.reason,
                code=exc.reason_code,
            )
            await asyncio.sleep(min(st.cfg.outbox.resend_after_s, 30.0))
            return False
        try:
            st.outbox.mark_sent(row.msg_id)
        except sqlite3.Error as exc:  # e.g. disk full: rolled back, so the row stays queued and goes out again
            self._write_failed("mark_sent", row.msg_id, exc)  # (a duplicate the aggregator answers from its store)
            return False
        st.metrics.published.inc()
        event(
            log,
            "update.published",
            site=st.site,
            counter=row.counter,
            msg_id=row.msg_id,
            chunks=len(chunks),
            attempt=row.attempts + 1,
        )
        return True

    def on_receipt(self, payload: bytes) -> None:
        """Settle the update a signed receipt names (a forged or foreign one is counted and dropped)."""
        st = self.state
        try:
            doc = open_receipt(payload, st.keys, st.enrollment.aggregator.sign_pub)  # checks the site
        except WireError as exc:
            st.metrics.malformed.labels("receipt").inc()
            event(log, "receipt.dropped", logging.WARNING, site=st.site, reason=str(exc))
            return
        verdict, reason = doc["verdict"], doc.get("reason")
        try:
            found = st.outbox.settle(doc["counter"], doc["msg_id"], verdict, reason, doc.get("version"))
        except sqlite3.Error as exc:  # e.g. disk full: rolled back; the row is resent and its receipt comes again
            self._write_failed("settle", doc["msg_id"], exc)
            return
        st.metrics.receipts.labels(verdict).inc()
        level = logging.WARNING if verdict in ("stale", "rejected") else logging.INFO
        event(
            log,
            f"receipt.{verdict}",
            level,
            site=st.site,
            counter=doc["counter"],
            msg_id=doc["msg_id"],
            reason=reason,
            version=doc.get("version"),
            matched=found,
        )
        if verdict in ("stale", "rejected"):
            st.last_error = f"update {doc['counter']} {verdict}: {reason}"
        st.changed()
        st.wake_send.set()  # the next update may go out now
        if found and st.publishing == "outbox_full":
            st.wake_train.set()  # stop_training: room again, so train now rather than at the next timer

    def _write_failed(self, op: str, msg_id: str, exc: sqlite3.Error) -> None:
        """An outbox write failed (rolled back by SQLite): count it, say it, and keep the agent running.

        Why not raise: the agent used to exit here when the disk filled between a publish and its ``mark_sent``
        (tests/faults/test_disk_full.py caught it); nothing is lost by going on, since the row is still queued on
        disk and store-and-forward sends it again once the write succeeds."""
        st = self.state
        st.metrics.outbox_write_failed.labels(op).inc()
        event(log, "outbox.write_failed", logging.ERROR, site=st.site, op=op, msg_id=msg_id, error=str(exc))
        st.error(f"outbox write failed ({op}): {exc}")
