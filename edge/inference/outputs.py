"""Where predictions go: a JSON-lines file, MQTT topics on the plant broker, Prometheus.

Every prediction is one JSON object ``{"seq", "ts", "score", "version", "model", "alarm",
"label"}`` (``model``: the first 12 hex digits of the ONNX's hash; ``alarm`` when a threshold is
set; ``label`` only when the row had one), so the file and the MQTT payloads can
be audited against each other and each score traced to the model version
that produced it. The file gets every prediction. MQTT gets them through a
bounded queue, on disk (:class:`edge.inference.spool.PredictionSpool`) in the
service: while the plant broker is away predictions wait there and go out in
order on its return; beyond the bound the oldest waiting ones are dropped and
counted rather than stalling the line's scoring.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from pathlib import Path
from typing import Any, TextIO

from prometheus_client import Counter, Gauge, Histogram

from fedline.logs import event
from fedline.metrics import MetricsConfig, MetricsServer, new_registry

log = logging.getLogger("fedline.infer.output")


class JsonlSink:
    """Appends predictions to a file, flushed after every batch; rotates it past ``max_bytes``.

    Rotation happens between batches, so no record is split: ``file`` becomes
    ``file.1`` (the older ones move up, beyond ``keep`` the oldest is removed)
    and a new ``file`` is started. ``max_bytes`` 0 never rotates.
    """

    def __init__(self, path: str | Path, max_bytes: int = 0, keep: int = 5) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.rotations = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: TextIO | None = self.path.open("a", encoding="utf-8")

    def write(self, records: list[dict[str, Any]]) -> None:
        if self._fh is None:
            return
        self._fh.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
        self._fh.flush()
        if self.max_bytes and self._fh.tell() >= self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        assert self._fh is not None
        self._fh.close()
        old = lambda i: self.path.with_name(f"{self.path.name}.{i}")
        old(self.keep).unlink(missing_ok=True)
        for i in range(self.keep - 1, 0, -1):
            if old(i).exists():
                old(i).rename(old(i + 1))
        self.path.rename(old(1))
        self._fh = self.path.open("a", encoding="utf-8")
        self.rotations += 1
        event(log, "output.rotated", path=str(self.path), kept=self.keep)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class MqttSink:
    """Publishes each prediction (and alarms separately) from a bounded queue, in order."""

    def __init__(
        self,
        client: Any,
        topic: str | None,
        alarm_topic: str | None,
        qos: int = 0,
        queue_max: int = 10000,
        spool: Any = None,
    ) -> None:
        self.client = client
        self.topic = topic
        self.alarm_topic = alarm_topic
        self.qos = qos
        self._queue: deque[tuple[str, bytes]] = deque()
        self._queue_max = queue_max
        self._wake = asyncio.Event()
        self.published = 0
        self.dropped = 0
        self.failed = 0
        self.spool = spool  # a PredictionSpool: on disk, kept until published; None: in memory

    def put(self, records: list[dict[str, Any]]) -> int:
        """Queue records; returns how many old ones were dropped to make room."""
        dropped = 0
        items: list[tuple[str, bytes]] = []
        for r in records:
            payload = json.dumps(r, separators=(",", ":")).encode()
            if self.topic:
                items.append((self.topic, payload))
            if self.alarm_topic and r.get("alarm"):
                items.append((self.alarm_topic, payload))
        if self.spool is not None:
            dropped = self.spool.put(items) if items else 0
            self.dropped += dropped
            self._wake.set()
            return dropped
        self._queue.extend(items)
        while len(self._queue) > self._queue_max:
            self._queue.popleft()
            dropped += 1
        self.dropped += dropped
        self._wake.set()
        return dropped

    def pending(self) -> int:
        return self.spool.depth()[0] if self.spool is not None else len(self._queue)

    async def _run_spool(self) -> None:
        """Publish the spool's messages in order; one leaves the spool only once published. While
        the broker is away (NotConnected) it stays and is tried again; a refused one is skipped."""
        from broker_bridge.errors import NotConnected, PublishRefused

        while True:
            batch = self.spool.head(64)
            if not batch:
                self._wake.clear()
                await self._wake.wait()
                continue
            done = None  # the last seq of this batch that is published (or refused): removed together
            try:
                for seq, topic, payload in batch:
                    try:
                        await self.client.publish(topic, payload, qos=self.qos)
                        self.published += 1
                    except PublishRefused as exc:
                        self.failed += 1
                        if self.failed == 1 or self.failed % 1000 == 0:
                            event(
                                log,
                                "output.publish_failed",
                                level=logging.WARNING,
                                topic=topic,
                                error=str(exc),
                                failed=self.failed,
                            )
                    done = seq
            except NotConnected:
                await asyncio.sleep(0.2)  # publish waits for the link itself; this only paces retries
            finally:
                if done is not None:
                    self.spool.remove_through(done)

    async def run(self) -> None:
        """Publish until cancelled; a refused or unacknowledged publish is counted and skipped
        (in memory), or kept and retried in order until the broker is back (with a spool)."""
        from broker_bridge.errors import FedlineError

        if self.spool is not None:
            await self._run_spool()
            return

        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            topic, payload = self._queue[0]
            try:
                await self.client.publish(topic, payload, qos=self.qos)
                self.published += 1
            except FedlineError as exc:
                self.failed += 1
                if self.failed == 1 or self.failed % 1000 == 0:  # a refusing broker must not flood the log
                    event(
                        log,
                        "output.publish_failed",
                        level=logging.WARNING,
                        topic=topic,
                        error=str(exc),
                        failed=self.failed,
                    )
            if self._queue and self._queue[0][1] is payload:
                self._queue.popleft()

    async def drain(self, timeout: float) -> None:
        """Wait (up to ``timeout``) until everything queued is published."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.pending() and loop.time() < end:
            await asyncio.sleep(0.01)


class Metrics:
    """The service's Prometheus metrics, in their own registry (several services per test process)."""

    def __init__(self) -> None:
        r = self.registry = new_registry()
        self.predictions = Counter("fedline_infer_predictions", "Predictions made", registry=r)
        self.alarms = Counter("fedline_infer_alarms", "Predictions at or above the alarm threshold", registry=r)
        self.score_errors = Counter("fedline_infer_score_errors", "Rows the model failed to score", registry=r)
        self.out_of_range = Counter(
            "fedline_infer_out_of_range", "Feature values outside their engineering range (clamped to it)", registry=r
        )
        self.score = Gauge("fedline_infer_score", "The latest score", registry=r)
        self.scores = Histogram(
            "fedline_infer_score_distribution",
            "Scores",
            buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0, float("inf")),
            registry=r,
        )
        self.version = Gauge("fedline_infer_model_version", "Version of the model in service", registry=r)
        self.swaps = Counter("fedline_infer_swaps", "Models taken into service (incl. rollbacks)", registry=r)
        self.refused = Counter("fedline_infer_refused", "Models and model messages refused", ["reason"], registry=r)
        self.swap_seconds = Gauge(
            "fedline_infer_swap_seconds", "Last swap: new version seen until it served", registry=r
        )
        self.batch_seconds = Histogram(
            "fedline_infer_batch_seconds",
            "Scoring time per batch",
            buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, float("inf")),
            registry=r,
        )
        self.queue = Gauge("fedline_infer_queue_rows", "Rows waiting to be scored", registry=r)
        self.served = Gauge(
            "fedline_infer_served_validation_metric",
            "The served model's metric on its site's validation rows, by kind (local, global, "
            'fine_tuned; the site\'s [personal] serve = "pick")',
            ["kind", "metric"],
            registry=r,
        )
        self.output_dropped = Counter(
            "fedline_infer_output_dropped", "Predictions dropped from the MQTT output queue", registry=r
        )

    def serve(self, cfg: MetricsConfig, file: str | None = None) -> MetricsServer:
        """Serve /metrics as ``[metrics]`` says (not at all without a port)."""
        server = MetricsServer(self.registry)
        server.start(cfg, service="infer", file=file)
        return server
