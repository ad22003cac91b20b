"""The edge agent: read plant data, train with DP-SGD, send sealed deltas, follow the global model.

One asyncio process with six tasks that share the on-disk state:

- **ingest**: samples from the configured sources → rows (``firmware_adapters.rows``)
  → the bounded local dataset; counts new rows and fires the training trigger;
- **train**: on every ``every_rows`` new rows or ``every_s`` seconds (whichever first,
  and only if there are new rows) one local round in a worker thread, then seal,
  and queue in the outbox together with the counter and the privacy accountant;
- **send**: while connected, publish queued updates in order, chunked, QoS 1;
- **receive**: signed receipts (rows leave the outbox only on these), the
  federation content key granted to this site, the sealed model manifest and
  weight chunks (decrypted, verified, then the next round rebases on them);
- **status**: a retained status message (``offline`` by last will) every
  ``status_interval_s`` and on every change, without anything computed from
  plant data (``edge.status_doc``); the plant's own figures on /metrics and in the logs.

Why training in a thread: a round takes seconds; the loop must keep receiving
receipts, publishing and answering the broker's keep-alives meanwhile.

Each task is a small class in its own module, sharing one ``edge.site_state.SiteState``: ``edge.ingest``,
``edge.rounds``, ``edge.sender`` (sending and receipts), ``edge.adopt`` (the global model),
``edge.status_publisher``, ``edge.recovering`` (a lost data dir), ``edge.cohort_link`` (secure aggregation) and
``edge.line_export`` (the line's ONNX). This class is the wiring: it builds them, subscribes, routes each
message to its task and runs the tasks under ``fedline.supervise``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from broker_bridge.client import BrokerSettings, Message, MqttClient
from broker_bridge.errors import TopicError
from edge.adopt import Adopter
from edge.cohort_link import CohortLink
from edge.config import EdgeConfig, load_edge_config, row_mapping
from edge.ingest import Ingest
from edge.line_export import LineExport
from edge.recovering import RecoveryTask
from edge.rounds import Rounds
from edge.sender import Sender
from edge.site_state import SiteState, load_identity
from edge.status_publisher import StatusPublisher
from fedline.logs import event
from fedline.supervise import run_until_stopped

log = logging.getLogger("fedline.edge")


def _shared(name: str) -> Any:
    """A read-only view of one field of the shared state (the agent's long-standing public attributes)."""
    return property(lambda self: getattr(self.state, name), doc=f"``SiteState.{name}`` (read-only here).")


class EdgeAgent:
    """One site. Construct (validates everything, opens the stores), then ``await agent.run()``."""

    # what callers and tests have always read on the agent; the tasks share them through ``self.state``
    base = _shared("base")
    personal = _shared("personal")
    ledger = _shared("ledger")
    recovery = _shared("recovery")
    publishing = _shared("publishing")
    last_error = _shared("last_error")
    last_round = _shared("last_round")
    model_refused = _shared("model_refused")
    new_rows = _shared("new_rows")
    sources_done = _shared("sources_done")
    client = _shared("client")
    epsilon = _shared("epsilon")

    def __init__(self, cfg: EdgeConfig) -> None:
        self.cfg = cfg
        keys, enrollment = load_identity(cfg)
        self.settings = BrokerSettings.from_table(cfg.broker, cfg.file, "broker", client_id=cfg.site)
        mapping = row_mapping(cfg)
        sources = self._build_sources()  # every config error before any store is opened
        self.state = st = SiteState(cfg, keys, enrollment, mapping)
        self.site, self.spec, self.dp, self.topics = st.site, st.spec, st.dp, st.topics
        self.keys, self.enrollment, self.keyring, self.metrics = st.keys, st.enrollment, st.keyring, st.metrics
        self.dataset, self.outbox, self.store, self.cohorts = st.dataset, st.outbox, st.store, st.cohorts
        self.shared_names, self.personal_names = st.shared_names, st.personal_names
        self.line_export = LineExport(st)
        self.ingest = Ingest(st, sources)
        self.rounds = Rounds(st, self.export_onnx)
        self.sender = Sender(st)
        self.adopter = Adopter(st, self.export_onnx)
        self.adopter.restore_last_good()
        self.status_publisher = StatusPublisher(st)
        self.recovering = RecoveryTask(st)
        self.cohort_link = CohortLink(st)
        self.metrics_port: int | None = None
        st.refresh_gauges()

    def _build_sources(self) -> list[Any]:
        from firmware_adapters import build_source

        return [build_source(t, file=self.cfg.file, where=f"sources[{i}]") for i, t in enumerate(self.cfg.sources)]

    # ------------------------------------------------------------------ what callers use
    def status(self, state: str = "online") -> dict[str, Any]:
        """The retained status document (``edge.status_publisher``)."""
        return self.status_publisher.status(state)

    def privacy_status(self) -> dict[str, Any]:
        """Public privacy parameters for the status message (``edge.status_publisher``)."""
        return self.status_publisher.privacy_status()

    async def train_once(self) -> str | None:
        """One round now: train, seal, queue. Returns the msg_id queued, or None when skipped."""
        return await self.rounds.train_once()

    async def export_onnx(self) -> Path | None:
        """Write the personalised ONNX for the line (``edge.line_export``); None when it could not be written."""
        return await self.line_export.export()

    # ------------------------------------------------------------------ receiving
    async def _receive_loop(self, client: MqttClient) -> None:
        async for msg in client.messages():
            try:
                await self.handle_message(msg)
            except Exception as exc:  # one bad message must not stop the agent
                self.metrics.malformed.labels("unexpected").inc()
                event(log, "message.failed", logging.ERROR, site=self.site, topic=msg.topic, error=repr(exc))

    async def handle_message(self, msg: Message) -> None:
        """Route one message from the broker to its task: receipts, grants, manifests, chunks, recovery, cohorts."""
        try:
            info = self.topics.parse(msg.topic)
        except TopicError:
            self.metrics.malformed.labels("topic").inc()
            return
        if info.kind == "receipts" and info.site == self.site:
            self.sender.on_receipt(msg.payload)
        elif info.kind == "fedkey" and info.site == self.site:
            await self.on_grant(msg.payload)
        elif info.kind == "manifest" and msg.payload:
            await self.adopter.on_manifest(msg.payload)
        elif info.kind in ("weights", "delta") and info.version is not None and msg.payload:
            await self.adopter.on_chunk(msg.topic, info.version, info.index or 0, msg.payload, info.kind == "delta")
        elif info.kind == "recovery_answer" and info.site == self.site and msg.payload:
            self.recovering.on_answer(msg.payload)
        elif info.kind.startswith("secagg_") and self.cohorts is not None:
            await self.cohort_link.on_message(info.kind, msg.payload, info.msg_id)

    async def on_grant(self, blob: bytes) -> None:
        """A key grant: to the model follower, then to the cohort messages that waited for that key."""
        if not await self.adopter.on_grant(blob):
            return
        for kind, payload, cohort in self.cohorts.take_waiting() if self.cohorts is not None else ():
            await self.cohort_link.on_message(kind, payload, cohort)

    # ------------------------------------------------------------------ run
    async def _on_connect(self, client: MqttClient) -> None:
        self.state.changed()
        self.status_publisher.reconnected()  # sent at once: the catch-up reads it, the will may have replaced it
        self.state.wake_send.set()

    async def _subscribe(self, client: MqttClient) -> None:
        await client.subscribe(self.topics.receipts(self.site), qos=1)
        if self.state.recovery is not None:
            await client.subscribe(self.topics.recovery_answer(self.site), qos=1)
        # the manifest and the weights, not the aggregator's ONNX: this agent builds its own from the
        # weights (with its personal head), so downloading every version's ONNX too only costs the link
        await client.subscribe(self.topics.fedkey(self.site), qos=1)
        await client.subscribe(self.topics.manifest(), qos=1)
        # the int8 steps only once a manifest names one this site can make (edge.adopt.Adopter._subscribe_steps);
        # the weights: of the version a manifest names when this site does not hold it, and then of the next one
        # (edge.adopt.Adopter.watch_next; not while int8 steps make the model)
        self.adopter.weights_subscribed = True
        if self.state.base.manifest:  # a version adopted before a restart: the next one's weights, ahead (on a
            await self.adopter.watch_next()  # cluster node without retained copies, a catch-up's live release)
        for topic in self.cohorts.subscriptions() if self.cohorts is not None else ():
            await client.subscribe(topic, qos=1)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (or the task is cancelled); the stores stay on disk."""
        stop = stop or asyncio.Event()
        self.status_publisher.announce()
        self.metrics_port = self.metrics.serve(self.cfg.metrics, self.cfg.file)
        await self.export_onnx()  # the line gets what this site holds now (a crash may have left it behind)
        client = MqttClient(self.settings, will=self.status_publisher.will(), on_connect=self._on_connect)
        self.state.client = client
        try:
            async with client:
                await self._subscribe(client)
                tasks = {
                    asyncio.create_task(c, name=f"edge:{self.site}:{n}")
                    for n, c in [
                        ("ingest", self.ingest.run()),
                        ("train", self.rounds.loop()),
                        ("send", self.sender.loop(client)),
                        ("receive", self._receive_loop(client)),
                        ("status", self.status_publisher.loop(client)),
                        ("recover", self.recovering.loop(client)),
                    ]
                }

                async def farewell() -> None:
                    await self.cohort_link.window.drain(2.0)  # replies in flight: acknowledged, or counted
                    if client.connected.is_set():
                        await self.status_publisher.publish(client, "offline", timeout=2.0)

                await run_until_stopped(tasks, stop, farewell, service="edge", site=self.site)
        finally:
            self.state.client = None
            self.metrics.stop()
            event(log, "edge.stopped", site=self.site)

    def close(self) -> None:
        """Close the stores (after :meth:`run` has returned)."""
        self.state.close()


async def run_agent(config: EdgeConfig | str | Path, stop: asyncio.Event | None = None) -> None:
    """Run one edge agent from a config (object or path to ``site.toml``) until ``stop`` is set."""
    cfg = config if isinstance(config, EdgeConfig) else load_edge_config(config)
    agent = EdgeAgent(cfg)
    try:
        await agent.run(stop)
    finally:
        agent.close()
