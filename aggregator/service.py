"""The aggregator as a service: MQTT in, receipts and model versions out.

Three asyncio tasks around one :class:`~aggregator.core.AggregatorCore`:

- **intake** reads chunks from ``fedline/<fed>/sites/+/update/#``, reassembles
  them, and hands each complete message to the core's thread pool to be
  opened (decrypt, verify, validate: both cores busy);
- **decider** takes opened updates in arrival order and runs the serial
  decision in a dedicated thread (SQLite and numpy, off the event loop), then
  publishes the signed receipts (QoS 1);
- **publisher** publishes each new version (weights + ONNX chunks, then the
  signed manifest, all retained and encrypted under the federation content
  key) and clears superseded versions. When versions come faster than ONNX
  export, it publishes the newest and skips the rest;
- **enrollment** re-reads the enrollment file when it changes: a revoked site
  starts a new key epoch (``aggregator.epochs``), whose key is granted to the
  remaining sites only (``aggregator.grants``).

A retained message on an update topic (Mosquitto cannot forbid retain per
topic, so a site could park data in the broker's store) is cleared and counted.

A bad message is counted, logged and answered; nothing here stops the
service except cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aggregator import catchup, grants, publish
from aggregator.config import AggregatorConfig
from aggregator.core import GROUP_MAX, AggregatorCore, Decision
from aggregator.metrics import Metrics
from aggregator.open_batches import OpenBatcher
from aggregator.opened_queue import OpenedQueue
from aggregator.opener import Opened
from aggregator.reassembly import SenderChunks, enforce_total_cap
from aggregator.recovery import RecoveryDesk
from aggregator.reducer import Forwards
from aggregator.secagg_cohort import CohortCoordinator
from broker_bridge.client import MqttClient
from broker_bridge.errors import FedlineError, TopicError, WireError
from broker_bridge.liveness import Liveness
from broker_bridge.publish_window import PublishWindow
from broker_bridge.topics import Topics
from fedline.logs import event
from fedline.metrics import MetricsServer
from fedline.startup import StartPause
from fedline.supervise import run_until_stopped
from fedline.threadname import name_os_thread

log = logging.getLogger("fedline.aggregator")


class Aggregator:
    """``await Aggregator(config).run()`` runs until cancelled (or :meth:`stop`)."""

    def __init__(self, cfg: AggregatorConfig, metrics: Metrics | None = None, start: StartPause | None = None) -> None:
        self.cfg = cfg
        self.start_pause = start  # the collector paused over the process's start (fedline.startup), ended here
        self.topics = Topics(cfg.aggregator.federation, cfg.aggregator.topic_prefix)
        self.metrics = metrics or Metrics()
        self._metrics_http = MetricsServer(self.metrics.registry)
        self.core: AggregatorCore | None = None
        self.cohorts: CohortCoordinator | None = None  # secure aggregation (aggregator.secagg_cohort)
        self.client: MqttClient | None = None
        # per site (or, as reducer, per worker: forwards authenticate themselves, no digest pass)
        self.chunks = SenderChunks(cfg.aggregator, self.metrics, check_digest=cfg.intake.workers < 2)
        self.reassemblers = self.chunks.reassemblers
        # [intake] workers >= 2: workers open the sites' updates; this process reads their forwards
        self.forwards = Forwards(cfg) if cfg.intake.workers >= 2 else None
        self.published_version = -1
        self.started = asyncio.Event()  # the core is loaded and subscribed
        self.published = asyncio.Event()  # set after every publish (tests clear and wait)
        self._new_version = asyncio.Event()
        # a key rotation and a model release never interleave: nothing under the old key follows the revoked
        # site's cleared grant on the wire
        self._epoch_lock = asyncio.Lock()
        self._release: publish.Release | None = None  # the last published release, for catch-up
        self._reads: dict[str, frozenset[str]] = {}  # per site, the formats its status says it reads
        self.catchup = catchup.CatchUp(cfg.aggregator.catchup_interval_s)
        self._catchup_wake = asyncio.Event()
        self._stop = asyncio.Event()
        # receipts and cohort messages: published in order without awaiting each acknowledgement (at most
        # publish_window.IN_FLIGHT outstanding; the decider waits beyond)
        self.window = PublishWindow(on_failure=self._unsent)
        # each pool's threads carry their names at the OS level too: `top -H` and `ps -T` tell them apart
        self._serial = ThreadPoolExecutor(1, thread_name_prefix="agg-decide", initializer=name_os_thread)
        self._export = ThreadPoolExecutor(1, thread_name_prefix="agg-export", initializer=name_os_thread)

    def stop(self) -> None:
        self._stop.set()

    def _core_and_preload(self) -> AggregatorCore:
        core = self._make_core()
        self._preload(core)
        return core

    def _preload(self, core: AggregatorCore) -> None:
        """Import now what the first publish would import inside itself: ``onnx`` for the ONNX (and torch's
        exporter for a model ``models.onnx_graph`` does not write), the torch an evaluation builds its model with.
        Nothing is computed: the same modules load, in the start, where its paused collector covers them and its
        freeze keeps them out of later collections (``fedline.startup``). An aggregator of a model
        ``models.onnx_graph`` writes (an MLP, an autoencoder) imports no torch without an ``[evaluation]``."""
        if self.start_pause is None or not (self.cfg.publish.onnx or self.cfg.evaluation is not None):
            return
        import importlib

        names: list[str] = []
        if self.cfg.publish.onnx:
            torch_export = core.onnx_needs_torch()
            names += ["models.export", "torch.onnx", "onnx"] if torch_export else ["models.onnx_graph", "onnx"]
        if self.cfg.evaluation is not None:
            names.append("models.nets")
        for name in names:
            importlib.import_module(name)

    def _start_done(self) -> None:
        """End the start's collector pause (freezing what it built) and log what the start cost."""
        if self.start_pause is None or self.start_pause.ended:
            return
        frozen = self.start_pause.end()
        event(
            log,
            "aggregator.start_cost",
            cpu_s=round(time.process_time(), 3),
            frozen_objects=frozen,
            torch="torch" in sys.modules,  # imported only for a model models.onnx_graph does not write, or evaluation
        )

    def _make_core(self) -> AggregatorCore:
        """The core (a plant aggregator makes a ``plant.core.PlantCore``); runs on the serial thread."""
        reopen = self.forwards.reopen if self.forwards is not None else None  # a reducer's buffer holds forwards
        return AggregatorCore(self.cfg, metrics=self.metrics, reopen=reopen)

    def _settings(self):
        s = self.cfg.broker
        if not s.client_id:  # a stable id keeps the persistent session (and its queued updates) across restarts
            s = dataclasses.replace(s, client_id=f"fedline-aggregator-{self.cfg.aggregator.federation}")
        return s

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.core = await loop.run_in_executor(self._serial, self._core_and_preload)
        self.granter = await loop.run_in_executor(self._serial, grants.Granter, self.core, self.topics)
        self.recovery = RecoveryDesk(self.core.history, self.core.keys)
        self._metrics_http.start(self.cfg.metrics, service="aggregator", file=self.cfg.file)
        queue = OpenedQueue(maxsize=max(4 * self.cfg.aggregator.workers, GROUP_MAX))  # room for a whole group
        settings = self._settings()
        self.liveness = Liveness(
            self.topics, settings.username or "aggregator", "aggregator", reduce=self.core.strategy.reduce_stat
        )
        try:
            async with MqttClient(settings, will=self.liveness.will(), on_connect=self.liveness.online) as client:
                self.client = client
                if self.forwards is None:
                    await client.subscribe(self.topics.updates_filter(), qos=1, retain_as_published=True)
                else:  # the reducer: the intake workers' forwards, never a site's update
                    await client.subscribe(self.topics.forwards_filter(), qos=1)
                # statuses: catch-up requests (aggregator.catchup) and, with secure aggregation, who is online
                await client.subscribe(self.topics.status_filter(), qos=1)
                await client.subscribe(self.topics.recovery_requests_filter(), qos=1)  # lost data directories
                if self.cfg.strategy.secure_aggregation:
                    granter = self.granter
                    self.cohorts = CohortCoordinator(
                        self.core, self.topics, lambda: (granter.epoch.number, granter.epoch.key)
                    )
                    await client.subscribe(self.topics.secagg_replies_filter(), qos=1)
                await client.connected.wait()  # subscribed (re-made on every connect) before we say so
                await self.granter.publish_grants(client)
                self.started.set()
                self._start_done()
                event(
                    log,
                    "aggregator.started",
                    federation=self.cfg.aggregator.federation,
                    url=self.cfg.broker.url,
                    version=self.core.version,
                    strategy=self.core.strategy.name,
                    reduce=self.core.strategy.reduce_stat,
                )
                tasks = [
                    asyncio.create_task(self._intake(client, queue), name="agg-intake"),
                    asyncio.create_task(self._decider(client, queue), name="agg-decider"),
                    asyncio.create_task(self._publisher(client), name="agg-publisher"),
                    asyncio.create_task(self._watch_enrollment(client), name="agg-enrollment"),
                    asyncio.create_task(self._catch_up(client), name="agg-catchup"),
                ]
                if self.cohorts is not None:
                    tasks.append(asyncio.create_task(self._cohort_clock(client), name="agg-cohorts"))
                await run_until_stopped(tasks, self._stop, lambda: self.liveness.stopped(client), service="aggregator")
                await self.window.drain(5.0)  # a stop sends what was decided
        finally:
            if self.start_pause is not None:
                self.start_pause.end()  # a start that failed: the collector runs again
            self.client = None
            self._metrics_http.stop()
            core = self.core
            await loop.run_in_executor(self._serial, core.close)
            self._serial.shutdown(wait=False)
            self._export.shutdown(wait=False)

    # -- intake -------------------------------------------------------------------------
    async def _intake(self, client: MqttClient, queue: OpenedQueue) -> None:
        core = self.core
        assert core is not None
        batcher = OpenBatcher(core.pool, self.cfg.aggregator.workers)  # what waits for a thread goes together
        async for msg in client.messages():
            if not msg.payload:
                continue  # an empty (cleared) retained message
            try:
                info = self.topics.parse(msg.topic)
            except TopicError:
                continue
            if info.kind == "status" and info.site is not None:
                self._on_status(info.site, msg.payload)
            if info.kind == "recovery_request" and info.site is not None:
                await self._answer_recovery(client, info.site, msg.payload)
                continue
            if info.kind == "forward" and self.forwards is not None and info.site is not None:
                done = self.chunks.add(info.site, msg.topic, msg.payload)
                if done is not None:  # a worker's forward: open it (decrypt, verify the worker) in the pool
                    fut = batcher.open(self.forwards.open, done[1], info.site)
                    await queue.put(fut)
                continue
            if info.kind != "update" or self.forwards is not None:
                if self.cohorts is not None and info.site is not None and info.kind in ("status", "secagg_reply"):
                    handler = self.cohorts.on_status if info.kind == "status" else self.cohorts.on_reply
                    await self._to_cohorts(client, handler, info.site, msg.payload)
                continue
            assert info.site is not None
            if msg.retain:  # a site parking data in the broker's store: clear it (empty retained), count it
                await grants.clear_retained(client, msg.topic, info.site, self.metrics)
            done = self.chunks.add(info.site, msg.topic, msg.payload, info.msg_id)
            if done is None:
                continue
            msg_id, blob = done
            fut = batcher.open(core.open, blob, info.site, msg_id)
            await queue.put(fut)  # bounded: back-pressure instead of unbounded memory

    # -- decisions and receipts ----------------------------------------------------------
    async def _decider(self, client: MqttClient, queue: OpenedQueue) -> None:
        loop = asyncio.get_running_loop()
        core = self.core
        assert core is not None
        left: list[Opened] = []  # what the last group commit left undecided (it ended at its version): next first
        while True:
            fut = None
            if not left:
                due = core.flush_due_in()
                try:
                    fut = await (queue.get() if due is None else asyncio.wait_for(queue.get(), max(due, 0.001)))
                except TimeoutError:  # the buffer waited buffer_timeout_s: reduce what it holds
                    fut = None
            try:
                if fut is None and not left:
                    decision = await loop.run_in_executor(self._serial, core.flush)
                    if decision is None:
                        continue
                    decisions = [decision]
                else:
                    if fut is not None:
                        op = await fut
                        if op.secagg and self.cohorts is not None:
                            if op.header is not None:  # a release like any other (aggregator.recovery)
                                await loop.run_in_executor(self._serial, core.history.note, op.header)
                            await self._to_cohorts(client, self.cohorts.on_submission, op)
                            continue
                        left = [op]
                    # with those received behind (waited for while opened): one commit up to the version it makes
                    # (AggregatorCore.decide_group), the receipts only after it
                    group, left = [*left, *(await queue.received_behind(GROUP_MAX - len(left)))], []
                    decisions, left = await loop.run_in_executor(self._serial, core.decide_group, group)
            except Exception as exc:  # a bug or a full disk must not end intake: log loudly, keep going
                left = []  # the group is not kept (AggregatorCore.decide_many): its sites resend
                event(log, "update.failed", level=logging.ERROR, error=repr(exc))
                continue
            if any(decision.new_version is not None for decision in decisions):
                self._new_version.set()
            await self._send_receipts(client, decisions)

    async def _send_receipts(self, client: MqttClient, decisions: list[Decision]) -> None:
        """The decisions' receipts, signed and sealed to their sites, published (QoS 1) without waiting for
        their acknowledgements: the decider goes on to the next group while they are in flight.

        Why: awaited one after another, the acknowledgements were the decider's ceiling. Each is a round trip
        through the broker and back through this event loop, which also reads every update's chunks: on the shared
        2-vCPU VM about 9 ms, 39-49 % of the decider's time at 23-30 updates/s, while the opened updates waited
        behind it and the intake behind them (BENCHMARKS.md, "Why the backlog grew at about 64 updates/s").
        Each publish starts here, in the decisions' order, through :attr:`window`
        (:class:`broker_bridge.publish_window.PublishWindow`, which bounds how many are outstanding); a receipt
        that fails is counted and logged, and its site's resend gets the same verdict from the store, as before."""
        core = self.core
        assert core is not None
        for decision in decisions:
            for r in decision.receipts:
                if r["site"] == "?":
                    continue
                reads = self._reads.get(r["site"], ())
                blob = core.sign_receipt(r, "FLR2" in reads, "FLR3" in reads)  # binary, compact, as the site reads
                if blob is None:  # not enrolled (or revoked): no key to seal its receipt to
                    continue
                try:
                    topic = self.topics.receipts(r["site"])
                except TopicError as exc:  # not a site id a topic can carry: nothing to publish to
                    self._unsent(r["site"], f"receipt {r['site']}#{r['counter']}", exc)
                    continue
                await self.window.publish(client, topic, blob, what=f"receipt {r['site']}#{r['counter']}")

    def _unsent(self, topic: str, what: str, exc: BaseException) -> None:
        """A receipt or cohort message the broker never acknowledged: counted and logged. A receipt comes again
        from the store when its site resends; a cohort that misses a message fails cleanly at its deadline."""
        kind = "receipt" if what.startswith("receipt") else "secagg"
        self.metrics.unsent.labels(kind).inc()
        event(log, f"{kind}.unsent", level=logging.WARNING, topic=topic, what=what, error=str(exc))

    async def _answer_recovery(self, client: MqttClient, site: str, payload: bytes) -> None:
        """A site that lost its data directory asks for its last counter and privacy history (aggregator.recovery).

        Answered on the serial thread, in order with the decisions: the counter it reads is the decided one.
        """
        loop = asyncio.get_running_loop()
        core = self.core
        assert core is not None

        def answer() -> bytes | None:
            return self.recovery.handle(site, payload, core.enrollment, core.store.max_counter(site))

        try:
            blob = await loop.run_in_executor(self._serial, answer)
        except WireError as exc:
            self.metrics.recovery.labels("refused").inc()
            event(log, "recovery.refused", level=logging.WARNING, site=site, reason=exc.reason, detail=exc.detail)
            return
        if blob is None:
            self.metrics.recovery.labels("rate_limited").inc()
            return
        try:
            await client.publish(self.topics.recovery_answer(site), blob, qos=1)
            self.metrics.recovery.labels("answered").inc()
        except (FedlineError, TopicError) as exc:  # the site asks again
            event(log, "recovery.unsent", level=logging.WARNING, site=site, error=str(exc))

    # -- secure-aggregation cohorts ---------------------------------------------------------
    async def _to_cohorts(self, client: MqttClient, handler: Any, *args: Any) -> None:
        """Run a cohort step on the serial thread (it may commit a version) and publish what it says."""
        loop = asyncio.get_running_loop()
        assert self.core is not None
        version = self.core.version
        try:
            outgoing = await loop.run_in_executor(self._serial, handler, *args)
        except Exception as exc:  # a bug must not end intake: log loudly, keep going
            event(log, "secagg.failed", level=logging.ERROR, error=repr(exc))
            return
        if self.core.version != version:
            self._new_version.set()
        # in order, without awaiting each acknowledgement: a flush's receipts, a cohort's unmask requests and the
        # clearing of its retained announcements leave together (the window keeps their order on the wire)
        for o in outgoing or ():
            what = "receipt" if o.topic.endswith("/receipts") else "secagg"
            await self.window.publish(client, o.topic, o.payload, retain=o.retain, what=what)

    async def _cohort_clock(self, client: MqttClient) -> None:
        assert self.cohorts is not None
        while True:
            await self._to_cohorts(client, self.cohorts.tick)
            await asyncio.sleep(0.5)

    # -- publishing ------------------------------------------------------------------------
    def _onnx(self, shared) -> bytes:
        assert self.core is not None
        return self.core.onnx(shared)

    def _build(self, version: int, shared) -> publish.Release:
        core = self.core
        assert core is not None and self.client is not None
        metric = None
        if core.evaluator is not None:
            ck = core.store.checkpoint(version, blobs=False)
            metric = ck.metric if ck is not None and ck.metric is not None else core.evaluator(shared)
            core.store.set_metric(version, metric)
            kind = self.cfg.evaluation.metric if self.cfg.evaluation is not None else None
            event(log, "model.evaluated", version=version, metric=metric, kind=kind)
        epoch = self.granter.epoch
        return publish.build_release(
            version,
            shared,
            self.cfg.model,
            self.cfg.aggregator.federation,
            core.keys,
            self.topics,
            self.client.chunk_limit,
            self._onnx if self.cfg.publish.onnx else None,
            epoch=epoch.number,
            content_key=epoch.key,
            metric=metric,
            extra=self._manifest_extra(version),
            # the int8 step from the version sites hold now (one they never got is of no use to them)
            step=step if (step := core.step_of(version, shared)) and step[0] == self.published_version else None,
            by_reference=self._all_read("FLT2"),
            spec_by_hash=self._all_read("FLM2"),
            steps=self.cfg.publish.quantise == "int8",
            binary_manifest=self._all_read("FLM3"),
        )

    def _all_read(self, fmt: str) -> bool:
        """Whether every enrolled site's status says it reads ``fmt`` (a site never heard from does not)."""
        sites = self.core.enrollment.sites if self.core is not None else {}
        return bool(sites) and all(fmt in self._reads.get(s, ()) for s in sites)

    def _manifest_extra(self, version: int) -> dict[str, Any] | None:
        """Fields a subclass adds to a version's signed manifest (a plant: the central version it serves)."""
        return None

    async def _publisher(self, client: MqttClient) -> None:
        loop = asyncio.get_running_loop()
        core = self.core
        assert core is not None
        while True:
            version, shared = core.snapshot
            if version != self.published_version:
                try:
                    release = await loop.run_in_executor(self._export, self._build, version, shared)
                    async with self._epoch_lock:
                        if release.manifest["epoch"] != self.granter.epoch.number:
                            continue  # the key changed while it was built: build it again under the new one
                        await publish.publish_release(client, self.topics, release)
                    await loop.run_in_executor(
                        self._serial, core.store.mark_published, version, release.weights_chunks, release.onnx_chunks
                    )
                    self.published_version = version
                    self._release = release  # what a site that missed it gets again (catch-up)
                    self.published.set()
                    await self.liveness.set_version(client, version)
                    await self._clear_old(client)
                except Exception as exc:  # broker gone, export failed...: retry, never end the service
                    event(log, "model.publish_failed", level=logging.WARNING, version=version, error=repr(exc))
                    await asyncio.sleep(1.0)
                    continue
            if core.snapshot[0] == self.published_version:
                await self._new_version.wait()
                self._new_version.clear()

    # -- catch-up: the current state again for a site that says it is behind ----------------
    def _on_status(self, site: str, payload: bytes) -> None:
        doc = catchup.parse_status(payload)
        enrolled = self.core is not None and site in self.core.enrollment.sites
        if doc is not None and enrolled and doc.get("state") != "offline":  # a will says nothing of the formats
            reads = doc.get("reads")
            self._reads[site] = (
                frozenset(r for r in reads if isinstance(r, str)) if isinstance(reads, list) else frozenset()
            )
        if doc is None or self._release is None or site not in self.core.enrollment.sites:  # type: ignore[union-attr]
            return
        if self.catchup.on_status(site, doc, version=self.published_version, epoch=self.granter.epoch.number):
            self._catchup_wake.set()

    async def _catch_up(self, client: MqttClient) -> None:
        """Answer sites behind on the model or the key: their grant, then the current release (aggregator.catchup)."""
        while True:
            with contextlib.suppress(TimeoutError):  # until a claim has settled, or a new one comes
                await asyncio.wait_for(self._catchup_wake.wait(), self.catchup.wait_s())
            self._catchup_wake.clear()
            sites = self.catchup.due()
            if not sites or self._release is None:
                continue
            try:
                async with self._epoch_lock:
                    for site in sites:
                        await self.granter.publish_grant(client, site)
                    if self._release.manifest["epoch"] == self.granter.epoch.number:
                        await publish.publish_release(client, self.topics, self._release)
                self.metrics.catchups.inc(len(sites))
                event(log, "catchup.answered", sites=len(sites), version=self._release.version)
            except FedlineError as exc:  # the sites ask again with their next status
                event(log, "catchup.failed", level=logging.WARNING, sites=len(sites), error=str(exc))

    async def _watch_enrollment(self, client: MqttClient) -> None:
        """Poll the enrollment file; on a change, take it and rotate the key epoch if a site was revoked."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.cfg.aggregator.enrollment_poll_s)
            async with self._epoch_lock:
                epoch = self.granter.epoch.number
                if await loop.run_in_executor(self._serial, self.granter.reload_if_changed):
                    flushed, self.granter.flushed = self.granter.flushed, None
                    if flushed is not None:  # the buffer was full without the revoked site: a new version
                        self._new_version.set()
                        await self._send_receipts(client, [flushed])
                    await self.granter.publish_grants(client)
                    if self.granter.epoch.number != epoch:  # the current version again, under the new key: a
                        self.published_version = -1  # re-keyed site holds only the new one (issue 14)
                        self._new_version.set()

    async def _clear_old(self, client: MqttClient) -> None:
        core = self.core
        assert core is not None
        live = core.store.published_versions()
        for version, wc, oc in live[: -self.cfg.publish.retain_versions]:
            items = [(t, b"") for t in publish.clear_topics(self.topics, version, wc, oc)]
            await client.publish_many(items, qos=1, retain=True)
            core.store.mark_cleared(version)
            event(log, "model.cleared", version=version, chunks=len(items))


async def run_aggregator(cfg: AggregatorConfig, start: StartPause | None = None) -> None:
    """Run until SIGINT/SIGTERM; ``start``: the collector's pause over the process's start, ended once started."""
    import signal

    agg = Aggregator(cfg, start=start)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, agg.stop)
        except (NotImplementedError, RuntimeError):
            pass
    await agg.run()


__all__ = ["Aggregator", "enforce_total_cap", "run_aggregator"]
_ = Any
