"""An intake worker: opens the updates of its share of the sites and forwards the results to the reducer.

Why: opening an update (MQTT chunks, reassembly, decrypt, SHA-256, Ed25519,
parse, validate) is the aggregator's work that grows with the sites, and one
Python process spends it on one interpreter. With ``[intake] workers = N``
(N >= 2), N of these processes (on one machine or several) share it, and the
aggregator becomes the reducer (:mod:`aggregator.reducer`), which keeps
everything that must stay in one place: the verdict store, the per-site rules,
the reduce, receipts and publishing.

- **Share**: rendezvous hashing (:mod:`aggregator.partition`) of the enrolled
  site ids over the live workers. The worker subscribes to
  ``sites/<site>/update/#`` for each site of its share, so all chunks of one
  update reach the same worker.
- **Liveness**: each worker keeps a retained ``online`` on
  ``services/intake-<i>/status`` and leaves a will saying ``offline``
  (:mod:`broker_bridge.liveness`). Every worker reads the others' and
  recomputes its share when one comes or goes: a worker killed with -9 loses
  its connection, the broker publishes its will, and the survivors subscribe
  to its sites. What it held half-received, or had opened but not forwarded,
  is lost with it; the sites' outboxes resend whatever got no receipt, and the
  reducer's store answers a resend of an update it already decided with the
  original verdict, so nothing is applied twice.
- **Forward**: each opened update, accepted or refused, is encrypted and
  authenticated (AES-256-GCM) under the key this worker shares with the
  aggregator (:mod:`aggregator.forward`),
  chunked onto ``intake/<worker>/<msg_id>/<i>``, in the order the updates
  completed.

A worker holds the aggregator's key file: sites seal their updates to the
aggregator's X25519 key, and whoever opens them needs its secret half (see
docs/architecture.md for what that means for where workers run).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import secrets
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from aggregator import grants, partition
from aggregator.config import AggregatorConfig
from aggregator.forward import seal_forward
from aggregator.metrics import Metrics
from aggregator.normbound import effective_bounds
from aggregator.opener import Opened, open_update
from aggregator.reassembly import SenderChunks
from broker_bridge import chunking, layouts
from broker_bridge.client import BrokerSettings, MqttClient
from broker_bridge.errors import FedlineError, TopicError
from broker_bridge.keys import Enrollment, KeyPair, OpeningKey
from broker_bridge.liveness import Liveness
from broker_bridge.mosquitto import intake_users
from broker_bridge.topics import Topics
from fedline.logs import event
from fedline.supervise import run_until_stopped
from fedline.threadname import name_os_thread

log = logging.getLogger("fedline.intake")
SERVICE = "intake"
#: a forward's chunks are this large where the broker allows (its CONNACK's maximum packet size caps it).
#: Measured moving a 4 MB forward through Mosquitto (publisher + subscriber + broker CPU): 256 KiB chunks
#: 28-36 ms, 1 MiB 20-24 ms, one 4 MB packet 26-29 ms (the broker's share doubles for multi-MB packets)
FORWARD_CHUNK = 1024 * 1024


def reference_shapes(cfg: AggregatorConfig) -> dict[str, tuple[int, ...]]:
    """The shared parameters' shapes of the configured model (what an update must match)."""
    from models.version0 import seed_shared_state  # without torch for the kinds it covers

    state = seed_shared_state(cfg.model, cfg.aggregator.seed)
    return {k: tuple(v.shape) for k, v in state.items()}


def _opening_key(cfg: AggregatorConfig) -> KeyPair | OpeningKey:
    """What a worker opens updates with: ``[intake] opening_key_file`` if set (no signing key), else the key pair."""
    if cfg.intake.opening_key_file:
        return OpeningKey.load(cfg.intake.opening_key_file)
    event(
        log,
        "intake.holds_signing_key",
        level=logging.WARNING,
        key_file=cfg.aggregator.key_file,
        detail="this worker reads the aggregator's signing key too: give it [intake] opening_key_file "
        "(fedline keys opening-key) so a compromised worker host cannot sign models or receipts",
    )
    return KeyPair.load(cfg.aggregator.key_file)


class IntakeWorker:
    """``await IntakeWorker(cfg, index).run()`` runs until cancelled (or :meth:`stop`)."""

    def __init__(self, cfg: AggregatorConfig, index: int, password_file: str | None = None) -> None:
        ids = intake_users(cfg.intake.workers)
        if not 0 <= index < len(ids):
            raise FedlineError(
                f"intake worker index {index} is not one of the {cfg.intake.workers} in "
                f"{cfg.file or 'the config'} ([intake] workers must be >= 2, index 0 ... workers - 1)"
            )
        self.cfg = cfg
        self.me = ids[index]
        self.peers = ids
        self.topics = Topics(cfg.aggregator.federation, cfg.aggregator.topic_prefix)
        self.keys = _opening_key(cfg)  # opens what sites sealed to the aggregator
        key_file = Path(cfg.intake.keys_dir) / f"{self.me}.key"
        self.worker_keys = KeyPair.load(key_file)  # its X25519 half keys the forwards (aggregator.forward)
        if self.worker_keys.role != "worker" or self.worker_keys.ident != self.me:
            raise FedlineError(
                f"{key_file}: a {self.worker_keys.role} key for {self.worker_keys.ident!r}, "
                f"intake worker {self.me!r} needs its own (fedline keys new --role worker --id {self.me})"
            )
        self.enrollment = Enrollment.load(cfg.aggregator.enrollment_file)
        if self.keys.public().box_pub != self.enrollment.aggregator.box_pub:
            raise FedlineError(
                f"{cfg.intake.opening_key_file or cfg.aggregator.key_file} is not the key of the aggregator "
                f"enrolled in {cfg.aggregator.enrollment_file}: sites seal their updates to that one"
            )
        self._enrollment_mtime = os.stat(cfg.aggregator.enrollment_file).st_mtime_ns
        self.reference = reference_shapes(cfg)
        layouts.register_model(self.reference)  # FLT2 updates name these tables by id
        n_params = sum(math.prod(s) for s in self.reference.values())
        _bound, self.max_norm = effective_bounds(cfg, n_params)
        self.settings = self._settings(password_file)
        self.metrics = Metrics()
        self.chunks = SenderChunks(cfg.aggregator, self.metrics)
        self.pool = ThreadPoolExecutor(
            cfg.aggregator.workers, thread_name_prefix="intake-open", initializer=name_os_thread
        )
        self.live: set[str] = set()  # peers whose retained liveness says online (self included once seen)
        self.share: set[str] = set()
        self.forwarded = 0
        self.started = asyncio.Event()
        self._stop = asyncio.Event()
        self._repartition = asyncio.Event()

    def _settings(self, password_file: str | None) -> BrokerSettings:
        b = self.cfg.broker
        if password_file is None and b.password_file:  # the aggregator's credentials folder holds ours too
            password_file = str(Path(b.password_file).with_name(f"{self.me}.password"))
        return dataclasses.replace(
            b,
            username=self.me,
            password=None if password_file else b.password,
            password_file=password_file,
            client_id=f"fedline-{self.me}-{self.cfg.aggregator.federation}",
            # no persistent session: what a worker subscribes to is a function of who is live now, and a
            # site resends what got no receipt
            clean_start=True,
            # forwards in as few packets as the broker takes (MQTT 5 says its limit in the CONNACK; chunk_limit
            # keeps under it): per message, not per byte, is what the reducer's loop pays for
            max_chunk=max(b.max_chunk, FORWARD_CHUNK) if b.protocol == "5" else b.max_chunk,
        )

    def stop(self) -> None:
        self._stop.set()

    def open(self, blob: bytes, site: str, msg_id: str) -> bytes:
        """Stage 1 for one update, then sealed for the reducer (runs in the pool: NaCl and numpy drop the GIL)."""
        op: Opened = open_update(
            blob,
            cfg=self.cfg,
            keys=self.keys,
            enrollment=self.enrollment,
            reference=self.reference,
            max_norm=self.max_norm,
            topic_site=site,
            msg_id=msg_id,
        )
        return seal_forward(op, self.worker_keys, self.keys.public().box_pub)

    async def run(self) -> None:
        liveness = Liveness(self.topics, self.me, SERVICE)
        queue: asyncio.Queue[asyncio.Future[bytes]] = asyncio.Queue(maxsize=4 * self.cfg.aggregator.workers)
        try:
            async with MqttClient(self.settings, will=liveness.will(), on_connect=liveness.online) as client:
                await client.subscribe(self.topics.service_status_filter(), qos=1)
                await client.wait_connected(self.cfg.broker.timeout_s)
                tasks = [
                    asyncio.create_task(self._intake(client, queue), name="intake-read"),
                    asyncio.create_task(self._forward(client, queue), name="intake-forward"),
                    asyncio.create_task(self._share(client), name="intake-share"),
                    asyncio.create_task(self._watch_enrollment(), name="intake-enrollment"),
                ]
                await run_until_stopped(tasks, self._stop, lambda: liveness.stopped(client), service="intake")
        finally:
            self.pool.shutdown(wait=False)

    # -- who reads which site ----------------------------------------------------------------
    def _on_liveness(self, user: str, payload: bytes) -> None:
        if user not in self.peers:
            return
        try:
            doc = json.loads(payload) if payload else {}
        except ValueError:
            return
        online = isinstance(doc, dict) and doc.get("service") == SERVICE and doc.get("state") == "online"
        if online != (user in self.live):
            (self.live.add if online else self.live.discard)(user)
            event(log, "intake.peer", worker=self.me, peer=user, online=online, live=sorted(self.live))
            self._repartition.set()

    async def _share(self, client: MqttClient) -> None:
        """Subscribe to the sites of this worker's share, again whenever the live workers or the sites change."""
        await asyncio.sleep(0.3)  # the retained liveness of the others arrives right after subscribing
        self._repartition.set()
        while True:
            await self._repartition.wait()
            self._repartition.clear()
            want = partition.share(self.enrollment.sites, self.live, self.me)
            gone, new = self.share - want, want - self.share
            for site in sorted(new):
                await client.subscribe(self.topics.updates_of(site), qos=1, retain_as_published=True)
            for site in sorted(gone):
                await client.unsubscribe(self.topics.updates_of(site))
                self.chunks.forget(site)
            self.share = want
            event(
                log,
                "intake.share",
                worker=self.me,
                sites=len(want),
                added=len(new),
                removed=len(gone),
                live=sorted(self.live | {self.me}),
            )
            self.started.set()

    async def _watch_enrollment(self) -> None:
        """A revoked site is refused (unenrolled) and leaves the partition; a new one joins it."""
        path = self.cfg.aggregator.enrollment_file
        while True:
            await asyncio.sleep(self.cfg.aggregator.enrollment_poll_s)
            try:
                mtime = os.stat(path).st_mtime_ns
                if mtime == self._enrollment_mtime:
                    continue
                new = Enrollment.load(path)
            except (OSError, FedlineError) as exc:  # half-written or broken: keep the one we have
                event(log, "enrollment.refused", level=logging.ERROR, file=path, error=str(exc))
                continue
            self._enrollment_mtime = mtime
            self.enrollment = new  # one reference assignment: open() in the pool sees old or new
            self._repartition.set()

    # -- updates in, forwards out ----------------------------------------------------------------
    async def _intake(self, client: MqttClient, queue: asyncio.Queue[asyncio.Future[bytes]]) -> None:
        loop = asyncio.get_running_loop()
        async for msg in client.messages():
            try:
                info = self.topics.parse(msg.topic)
            except TopicError:
                continue
            if info.kind == "service_status" and info.site is not None:
                self._on_liveness(info.site, msg.payload)
                continue
            if info.kind != "update" or info.site is None or not msg.payload:
                continue
            if msg.retain:  # a site parking data in the broker's store: clear it, count it
                await grants.clear_retained(client, msg.topic, info.site, self.metrics)
            done = self.chunks.add(info.site, msg.topic, msg.payload, info.msg_id)
            if done is None:
                continue
            msg_id, blob = done
            fut: Future[bytes] = self.pool.submit(self.open, blob, info.site, msg_id)
            await queue.put(asyncio.wrap_future(fut, loop=loop))  # bounded: back-pressure

    async def _forward(self, client: MqttClient, queue: asyncio.Queue[asyncio.Future[bytes]]) -> None:
        while True:
            fut = await queue.get()
            try:
                blob = await fut
            except Exception as exc:  # a bug must not end intake: log loudly, keep going (the site resends)
                event(log, "intake.failed", level=logging.ERROR, worker=self.me, error=repr(exc))
                continue
            msg_id = secrets.token_hex(8)
            topic0 = self.topics.forward_chunk(self.me, msg_id, 0)
            # no chunk digest: the reducer does not check one (AES-GCM authenticates the forward whole)
            parts = chunking.split(blob, msg_id, client.chunk_limit(topic0), digest=False)
            items = [(self.topics.forward_chunk(self.me, msg_id, i), c) for i, c in enumerate(parts)]
            try:
                await client.publish_many(items, qos=1)
                self.forwarded += 1
            except FedlineError as exc:  # lost with this worker's link; the site resends after its timeout
                event(log, "forward.unsent", level=logging.WARNING, worker=self.me, error=str(exc))


async def run_worker(cfg: AggregatorConfig, index: int, password_file: str | None = None) -> None:
    """Run intake worker ``index`` until SIGINT/SIGTERM."""
    import signal

    worker = IntakeWorker(cfg, index, password_file)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, worker.stop)
    event(log, "intake.started", worker=worker.me, federation=cfg.aggregator.federation, url=cfg.broker.url)
    await worker.run()


__all__ = ["IntakeWorker", "run_worker"]
