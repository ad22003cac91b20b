"""The plant as a site of the central federation: its deltas out, receipts and the central model in.

Why the edge's parts and not new ones: the plant's deltas must be as safe on
the way up as any line's. So each is sealed to the central aggregator and
signed with the plant's site key (``broker_bridge.envelope``), queued in an
``edge.outbox.Outbox`` (on disk before any attempt to send, in counter order,
forgotten only on the central aggregator's signed receipt, resent after
``resend_after_s`` without one), and the central model is followed as an edge
follows it: the key grant sealed to the plant (``federation_key.Keyring``),
the sealed manifest, the encrypted weight chunks (``edge.follow``) and the
checks of ``edge.model_store.check_global_model``.

A cut of the plant-to-central link therefore costs nothing but time: the
plant keeps serving its lines from its own broker, its reduces wait in the
outbox, and they go out in order when the link is back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from broker_bridge import quantised
from broker_bridge.chunking import split
from broker_bridge.client import Message, MqttClient, will_message
from broker_bridge.envelope import UpdateHeader, open_receipt, seal_update
from broker_bridge.errors import FedlineError, ModelRefused, NotConnected, PublishRefused, TopicError, WireError
from broker_bridge.keys import Enrollment, KeyPair
from broker_bridge.publish_window import PublishWindow
from broker_bridge.topics import Topics
from edge.follow import ModelFollower
from edge.outbox import Outbox, OutboxFull
from edge.secagg_member import EdgeCohorts
from edge.status_doc import build_status
from fedline.config import ConfigError
from fedline.logs import event
from fedline.supervise import run_until_stopped
from models.spec import ModelSpec
from plant.cohorts import Reduce, combine
from plant.config import UpstreamConfig
from plant.metrics import UplinkMetrics

log = logging.getLogger("fedline.plant")

State = dict[str, np.ndarray]
QUEUED_THROUGH = "upstream_version"  # outbox meta: the last plant version whose delta is queued


class Uplink:
    """One site of the central federation, fed by the plant's core (thread-safe :meth:`queue_delta`)."""

    def __init__(
        self, cfg: UpstreamConfig, spec: ModelSpec, file: str | None = None, metrics: UplinkMetrics | None = None
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics or UplinkMetrics(CollectorRegistry())
        self.replies = PublishWindow(on_failure=self._reply_unsent)  # cohort replies
        self.site = cfg.site
        self.spec = spec
        self.keys = KeyPair.load(cfg.key_file)
        if self.keys.role != "site" or self.keys.ident != cfg.site:
            raise ConfigError(
                file,
                "upstream.key_file",
                f"key file is for {self.keys.role} {self.keys.ident!r}, not site {cfg.site!r}",
            )
        self.enrollment = Enrollment.load(cfg.enrollment_file)
        if self.enrollment.federation != cfg.federation:
            raise ConfigError(
                file,
                "upstream.enrollment_file",
                f"enrollment is for federation {self.enrollment.federation!r}, not {cfg.federation!r}",
            )
        self.topics = Topics(cfg.federation, cfg.topic_prefix)
        o = cfg.outbox
        self.outbox = Outbox(Path(cfg.data_dir) / "outbox.sqlite", o.max_bytes, o.max_count, "stop_training")
        self.central_version = -1  # the newest central version adopted (the plant's core says at start)
        # the central model, followed as an edge follows it (edge.follow); its shapes come from the plant's core
        self.follower = ModelFollower(
            self.keys, self.enrollment.aggregator.sign_pub, cfg.federation, spec, [], {}, self._wants
        )
        self.keyring = self.follower.keyring
        self.on_model: Callable[[int, State], Awaitable[None]] | None = None  # adopt a verified central version
        self.on_room: Callable[[], Awaitable[None]] | None = None  # a receipt freed the outbox: queue what waits
        self.client: MqttClient | None = None
        self.full = False  # the outbox refused a delta (it is retried on the next receipt)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._status_dirty = asyncio.Event()
        # central secure aggregation (plant.cohorts): the cohorts joined, and the reduces waiting for one
        self.cohorts = (
            EdgeCohorts(self.keys, self.enrollment, self.topics, Path(cfg.data_dir), self.keyring)
            if cfg.secure_aggregation
            else None
        )
        self.pending_reduces: Callable[[], Awaitable[list[Reduce]]] | None = None  # the core's, off its thread
        self._cohort_wake = asyncio.Event()
        self._count_outbox()  # what a restart finds waiting

    def _wants(self, version: int) -> bool:
        return version > self.central_version

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shared tensors' shapes of the plant's model: what a central version must carry."""
        return self.follower.shapes

    @shapes.setter
    def shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.follower.shapes = dict(shapes)
        self.follower.shared_names = list(shapes)

    # -- the core's side (its serial thread) ------------------------------------------------
    def queued_through(self) -> int:
        return int(self.outbox.get_meta(QUEUED_THROUGH, "0") or 0)

    def queue_delta(
        self, plant_version: int, base_version: int, delta: State, n_samples: int, privacy: dict[str, Any]
    ) -> bool:
        """Seal one plant reduce as an update of this site and queue it; False when it cannot be now.

        Under central secure aggregation a reduce waits for a cohort (:meth:`_submit_to_cohort`): this
        only wakes that task, and the reduce stays in the plant's store until it goes into one.
        """
        if self.cohorts is not None:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._cohort_wake.set)
            return False
        header = self._header(base_version, n_samples, privacy, self.cfg.update.encoding)
        tensors = quantised.encode(delta, header.encoding)  # int8: after the lines' DP noise (post-processing)
        blob = seal_update(header, tensors, self.keys, self.enrollment.aggregator.box_pub)
        return self._put(plant_version, header, blob)

    def _header(self, base_version: int, n_samples: int, privacy: dict[str, Any], encoding: str) -> UpdateHeader:
        return UpdateHeader(
            site=self.site,
            counter=self.outbox.last_counter() + 1,
            msg_id=secrets.token_hex(8),  # random: the topic names no counter and no plant version
            base_version=base_version,
            n_samples=max(1, n_samples),
            privacy=privacy,
            encoding=encoding,
        )

    def _put(self, plant_version: int, header: UpdateHeader, blob: bytes) -> bool:
        """The sealed delta into the outbox with ``upstream_version`` in the same transaction."""
        counter, msg_id, base_version, privacy = header.counter, header.msg_id, header.base_version, header.privacy
        try:
            self.outbox.put(
                site=self.site,
                counter=counter,
                msg_id=msg_id,
                base_version=base_version,
                n_samples=header.n_samples,
                epsilon=privacy.get("epsilon"),
                blob=blob,
                meta={QUEUED_THROUGH: str(plant_version)},
            )
        except (OutboxFull, sqlite3.Error) as exc:  # rolled back: retried after the next receipt
            self.full = True
            self._count_outbox()
            event(log, "plant.delta_waiting", level=logging.WARNING, plant_version=plant_version, error=str(exc))
            return False
        self.full = False
        self.metrics.deltas_queued.inc()
        self._count_outbox()
        event(
            log,
            "plant.delta_queued",
            plant_version=plant_version,
            counter=counter,
            base_version=base_version,
            n_samples=header.n_samples,
            lines=privacy.get("lines"),
            epsilon=privacy.get("epsilon"),
            accounting=privacy.get("accounting"),
            encoding=header.encoding,
            bytes=len(blob),
        )
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._poke)
        return True

    def _count_outbox(self) -> None:
        depth, nbytes = self.outbox.depth()
        self.metrics.outbox(depth, nbytes, self.full)

    def _poke(self) -> None:
        self._wake.set()
        self._status_dirty.set()

    # -- running ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Connect to the central federation and run until cancelled."""
        self._loop = asyncio.get_running_loop()
        settings = self.cfg.broker
        if not settings.client_id:
            settings = dataclasses.replace(settings, client_id=f"fedline-plant-{self.site}")
        offline = json.dumps({"state": "offline", "reason": "connection lost"}).encode()
        client = MqttClient(
            settings, will=will_message(self.topics.status(self.site), offline), on_connect=self._on_connect
        )
        self.client = client
        self.metrics.connected.set_function(lambda: float(client.connected.is_set()))
        async with client:
            for topic in (
                self.topics.receipts(self.site),
                self.topics.fedkey(self.site),
                self.topics.manifest(),
                self.topics.weights_filter(),
            ):
                await client.subscribe(topic, qos=1)
            for topic in self.cohorts.subscriptions() if self.cohorts is not None else ():
                await client.subscribe(topic, qos=1)
            tasks = [
                asyncio.create_task(self._send_loop(client), name="plant-up-send"),
                asyncio.create_task(self._receive_loop(client), name="plant-up-receive"),
                asyncio.create_task(self._status_loop(client), name="plant-up-status"),
            ]
            if self.cohorts is not None:
                self._cohort_wake.set()  # reduces left waiting by a restart: a retained cohort may take them
                tasks.append(asyncio.create_task(self._cohort_loop(), name="plant-up-cohorts"))
            try:  # until cancelled (the plant service stops it) or a loop fails
                await run_until_stopped(tasks, asyncio.Event(), service="plant", site=self.site)
            finally:
                self.client = None
                self.metrics.connected.set_function(lambda: 0.0)
                await self.replies.drain(2.0)  # replies in flight: acknowledged, or counted

    async def _on_connect(self, client: MqttClient) -> None:
        self._poke()

    async def _send_loop(self, client: MqttClient) -> None:
        """Strictly in counter order, one without a receipt at a time (the edge's rule, ``edge.outbox``)."""
        resend = self.cfg.outbox.resend_after_s
        while True:
            await client.connected.wait()
            now = time.time()
            for row in self.outbox.rows()[:1]:
                if row.sent_at is not None and row.sent_at >= now - resend:
                    break  # waiting for its receipt
                chunks = split(
                    row.blob, row.msg_id, client.chunk_limit(self.topics.update_chunk(self.site, row.msg_id, 0))
                )
                items = [(self.topics.update_chunk(self.site, row.msg_id, i), c) for i, c in enumerate(chunks)]
                try:
                    await client.publish_many(items, qos=1)
                except (NotConnected, PublishRefused) as exc:
                    event(log, "plant.delta_unsent", level=logging.WARNING, counter=row.counter, error=str(exc))
                    break
                self.outbox.mark_sent(row.msg_id)
                self.metrics.deltas_published.inc()
                event(log, "plant.delta_published", counter=row.counter, chunks=len(items), attempt=row.attempts + 1)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=min(resend, 5.0))
            except TimeoutError:
                pass

    async def _receive_loop(self, client: MqttClient) -> None:
        async for msg in client.messages():
            try:
                await self.handle(msg)
            except Exception as exc:  # one bad message must not stop the plant
                event(log, "plant.message_failed", level=logging.ERROR, topic=msg.topic, error=repr(exc))

    async def handle(self, msg: Message) -> None:
        """Receipts for the plant's deltas, its key grant, the central manifest and weight chunks."""
        try:
            info = self.topics.parse(msg.topic)
        except TopicError:
            return
        if not msg.payload and not info.kind.startswith("secagg_"):  # a cleared cohort message ends its cohort
            return
        if info.kind == "receipts" and info.site == self.site:
            await self._on_receipt(msg.payload)
        elif info.kind == "fedkey" and info.site == self.site:
            try:
                epoch = self.follower.on_grant(msg.payload)
            except WireError as exc:
                self.metrics.messages_dropped.labels("fedkey").inc()
                event(log, "plant.fedkey_dropped", level=logging.WARNING, reason=str(exc))
                return
            event(log, "plant.fedkey", epoch=epoch)
            waiting = self.follower.take_waiting()
            if waiting is not None:
                await self._on_manifest(waiting)
            for kind, payload, cohort in self.cohorts.take_waiting() if self.cohorts is not None else ():
                await self._on_cohort_message(kind, payload, cohort)
            self._status_dirty.set()
        elif info.kind.startswith("secagg_") and self.cohorts is not None:
            await self._on_cohort_message(info.kind, msg.payload, info.msg_id)
        elif info.kind == "manifest":
            await self._on_manifest(msg.payload)
        elif info.kind == "weights" and info.version is not None:
            try:
                self.follower.on_chunk(info.version, info.index or 0, msg.payload)
            except WireError as exc:
                self.metrics.messages_dropped.labels("weights").inc()
                event(log, "plant.chunk_dropped", level=logging.WARNING, topic=msg.topic, reason=str(exc))
                return
            await self._try_adopt()

    async def _on_receipt(self, payload: bytes) -> None:
        try:
            doc = open_receipt(payload, self.keys, self.enrollment.aggregator.sign_pub)
        except WireError as exc:
            self.metrics.messages_dropped.labels("receipt").inc()
            event(log, "plant.receipt_dropped", level=logging.WARNING, reason=str(exc))
            return
        found = self.outbox.settle(doc["counter"], doc["msg_id"], doc["verdict"], doc.get("reason"), doc.get("version"))
        self.metrics.receipts.labels(doc["verdict"]).inc()
        self._count_outbox()
        level = logging.WARNING if doc["verdict"] in ("stale", "rejected") else logging.INFO
        event(
            log,
            f"plant.receipt_{doc['verdict']}",
            level=level,
            counter=doc["counter"],
            reason=doc.get("reason"),
            version=doc.get("version"),
            matched=found,
        )
        self._poke()
        if found and self.full and self.on_room is not None:
            await self.on_room()

    async def _on_manifest(self, sealed: bytes) -> None:
        try:
            self.follower.on_manifest(sealed)
        except ModelRefused as exc:
            self.metrics.models_refused.inc()
            event(log, "plant.model_refused", level=logging.WARNING, version=exc.version, reason=str(exc))
            return
        await self._try_adopt()

    async def _try_adopt(self) -> None:
        try:
            g = self.follower.complete()
        except ModelRefused as exc:
            self.metrics.models_refused.inc()
            event(log, "plant.model_refused", level=logging.WARNING, version=exc.version, reason=str(exc))
            return
        if g is None:
            return
        if g.version <= self.central_version or self.on_model is None:
            return
        await self.on_model(g.version, g.shared)
        self.central_version = g.version
        self.metrics.central_version.set(g.version)
        self._status_dirty.set()
        self._cohort_wake.set()  # a cohort on this version may have arrived before it

    # -- central secure aggregation (plant.cohorts) ------------------------------------------
    async def _on_cohort_message(self, kind: str, payload: bytes, cohort: str | None) -> None:
        """A cohort joined wakes the submission task; survivors and unmask requests get a sealed reply."""
        assert self.cohorts is not None
        joined, reply = self.cohorts.route(kind, payload, cohort)
        if joined:
            self._cohort_wake.set()
        if reply is not None and self.client is not None:
            # in order, without this receive loop awaiting the acknowledgement (broker_bridge.publish_window)
            await self.replies.publish(self.client, self.topics.secagg_reply(self.site), reply, what=f"{kind} reply")

    def _reply_unsent(self, topic: str, what: str, exc: BaseException) -> None:
        """Away when asked: a dropout the cohort tolerates; counted and logged."""
        self.metrics.secagg_replies_unsent.inc()
        event(log, "plant.secagg_reply_unsent", level=logging.WARNING, what=what, error=str(exc))

    async def _cohort_loop(self) -> None:
        while True:
            await self._cohort_wake.wait()
            self._cohort_wake.clear()
            try:
                await self._submit_to_cohort()
            except Exception as exc:  # the reduces stay waiting for the next cohort
                event(log, "plant.cohort_submit_failed", level=logging.ERROR, error=repr(exc))

    async def _submit_to_cohort(self) -> bool:
        """Every reduce waiting, as one masked update of the cohort joined on the served central version."""
        cohorts = self.cohorts
        if cohorts is None or self.pending_reduces is None or cohorts.ready(self.central_version) is None:
            return False
        reduces = await self.pending_reduces()
        ann = cohorts.ready(self.central_version)  # again: the cohort may have ended meanwhile
        if not reduces or ann is None:
            return False
        last, delta, samples, privacy = combine(reduces)
        header = self._header(ann.base_version, samples, privacy, "float32")  # the mask encodes its own field
        blob = cohorts.seal(header, delta)  # recorded in the answer log before it is masked: once per cohort
        queued = self._put(last, header, blob)
        event(log, "plant.cohort_submitted", cohort=ann.cohort, reduces=len(reduces), queued=queued)
        return queued

    # -- status on the central broker ------------------------------------------------------
    def status(self, state: str = "online") -> dict[str, Any]:
        """The plant's retained status in the central federation: the version it serves, no line's data."""
        return build_status(
            state=state,
            version=self.central_version,  # -1 before any: the central catch-up answers a plant that is behind
            privacy={"accounting": "per_line"},  # each line's ε is its own (plant.core); the lines' statuses say it
            publishing="outbox_full" if self.full else "ok",
            outbox_depth=self.outbox.depth()[0],
            epoch=max(self.keyring, default=-1),
        )

    async def _status_loop(self, client: MqttClient) -> None:
        while True:
            try:
                await asyncio.wait_for(self._status_dirty.wait(), timeout=self.cfg.status_interval_s)
            except TimeoutError:
                pass
            self._status_dirty.clear()
            await client.connected.wait()
            try:
                payload = json.dumps(self.status()).encode()
                await client.publish(self.topics.status(self.site), payload, qos=1, retain=True)
            except FedlineError as exc:
                event(log, "plant.status_unsent", level=logging.DEBUG, error=str(exc))
            await asyncio.sleep(0.2)  # coalesce bursts

    def close(self) -> None:
        self.outbox.close()
        if self.cohorts is not None:
            self.cohorts.close()
