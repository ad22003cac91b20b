"""The line-inference service: rows in, scored predictions out, models swapped without a gap.

Tasks on one event loop:

- **reader**: pulls rows from the sources (or an injected async iterator),
  numbers them (``seq``) and queues them; a full queue holds the source back.
- **scorer**: takes up to ``batch_max`` queued rows, reads the model
  reference *once*, scores the batch and emits one prediction per row with
  that model's version. Nothing else runs on the loop while a batch is
  scored, so a swap (one assignment on the loop) always falls between two
  batches: no row is scored twice, none is skipped, and each score comes from
  the version current when it was scored.
- **watcher**: the manifest topic (MQTT) or the model directory (polling)
  offers new versions to the **loader**, which builds and probes the session
  and runs the canary in a worker thread, then swaps on the loop.
- **rollback**: a request file from ``fedline infer --rollback`` or a message
  on the command topic puts the previous good version back.

The module imports onnxruntime and numpy, never torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from broker_bridge.envelope import content_hash
from broker_bridge.errors import ModelRefused
from broker_bridge.topics import Topics
from edge.inference.config import InferConfig, broker_settings
from edge.inference.model_dir import ModelDirError, read_model, read_pointer
from edge.inference.outputs import JsonlSink, Metrics, MqttSink
from edge.inference.session import LoadedModel, ModelInfo, build_model, canary_check
from edge.inference.state import SavedModel, Serving, StateDir
from fedline.logs import event

log = logging.getLogger("fedline.infer")

_END = object()


@dataclass(frozen=True)
class Candidate:
    """A new version offered by a watcher, not yet built."""

    info: ModelInfo
    blob: bytes


@dataclass(frozen=True)
class Swap:
    """One change of the model in service: from which sample on, and how long it took."""

    version: int
    previous: int | None
    first_seq: int  # the first row scored by ``version``
    seconds: float  # new version seen -> serving (0 for rollbacks and restarts)
    kind: str  # "reload" | "rollback" | "restore"


@dataclass
class ServiceStats:
    rows: int = 0
    predictions: int = 0
    alarms: int = 0
    score_errors: int = 0
    batches: int = 0
    refused: Tally = field(default_factory=Tally)
    swaps: list[Swap] = field(default_factory=list)
    served: dict[str, Any] | None = None  # the model in service: kind and validation metric (edge/personal.py)
    batch_latency: deque = field(default_factory=lambda: deque(maxlen=100_000))  # (rows, seconds)
    row_latency: deque = field(default_factory=lambda: deque(maxlen=100_000))  # queued -> emitted, s


def row_shape(rows_table: dict[str, Any], file: str | None = None) -> tuple[int, ...]:
    """Shape of one row's ``x`` from the ``[rows]`` table (what RowBuilder will produce)."""
    from firmware_adapters.rows import parse_row_mapping

    m = parse_row_mapping(rows_table, file=file)
    n = len(m.features)
    if m.aggregate_s is not None:
        return (n * len(m.aggregates),)
    return (m.window, n) if m.window > 1 else (n,)


class InferenceService:
    """One line's scoring service. ``await service.run()``; ``service.stop()`` ends it.

    ``rows`` replaces the configured sources with any async iterator of objects
    with ``x`` (float32 array of the row shape), ``y`` (label or None) and
    ``ts`` — what :class:`firmware_adapters.rows.RowBuilder` makes; tests and
    the benchmark use it to drive an exact stream.
    """

    def __init__(
        self,
        cfg: InferConfig,
        rows: AsyncIterator[Any] | None = None,
        on_predictions: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self.cfg = cfg
        line = cfg.line
        self.topics = Topics(line.federation, line.topic_prefix)
        self.row_shape = row_shape(cfg.rows, cfg.file)
        from firmware_adapters.rows import parse_row_mapping

        mapping = parse_row_mapping(cfg.rows, file=cfg.file)
        self.task = mapping.task
        # the canary is on wherever the rows carry a label ([rows] label), unless [line.canary] enabled = false
        self.canary_on = line.canary.enabled and mapping.label is not None
        self.state = StateDir(cfg.path(line.state_dir))
        self.metrics = Metrics()
        self.stats = ServiceStats()
        self.current: LoadedModel | None = None
        self.previous: LoadedModel | None = None
        self.blocked_version = -1
        self.ready = asyncio.Event()
        self._rows_in = rows
        self._on_predictions = on_predictions
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=line.queue_max)
        self._seq = 0  # next seq the reader hands out
        self._next_scored = 0  # seq of the next row the scorer will score
        self._candidates: asyncio.Queue[Candidate] = asyncio.Queue()
        self._failed: set[tuple[int, str]] = set()  # refused or rolled back from: never tried again
        self._blocked: list[tuple[int, str]] = []  # rolled back from (persisted)
        self._canary: deque[tuple[np.ndarray, float]] = deque(maxlen=line.canary.rows)
        self._stopping = asyncio.Event()
        self._sink = (
            JsonlSink(
                cfg.path(cfg.output.file), max_bytes=int(cfg.output.file_max_mb * 2**20), keep=cfg.output.file_keep
            )
            if cfg.output.file
            else None
        )
        self._mqtt_out: MqttSink | None = None
        self._http: Any = None
        self._liveness: Any = None  # broker_bridge.liveness.Liveness when following the federation broker
        self._fed_client: Any = None
        self._background: set[asyncio.Task[Any]] = set()
        self.origin = line.model_source
        self.rows_error: BaseException | None = None
        self._verifier: Any = None  # line commands: built on the first one (reads the key files)
        self.model_refused: dict[str, Any] | None = None  # the last version refused as too far a step

    # ------------------------------------------------------------------ versions
    def current_version(self) -> int:
        """Newest version this line has served or refused by rollback (watchers offer only newer)."""
        v = self.current.version if self.current is not None and self.current.info.origin == self.origin else -1
        return max(v, self.blocked_version)

    def is_new(self, version: int, blob_hash: str) -> bool:
        """Whether an offered model should be tried.

        From the manifest, only a newer global version. From the model
        directory also the same version with another hash: the edge agent
        re-exports after each local round (same global body, retrained
        personal head). Never a model refused, nor the bytes of one rolled back from.
        """
        if (version, blob_hash) in self._failed or any(h == blob_hash for _, h in self._blocked):
            return False
        if self.current is not None and self.current.info.hash == blob_hash:
            return False
        if self.origin == "model_dir":
            return version >= self.current_version()
        return version > self.current_version()

    def refuse(self, reason: str, detail: str, version: int | None) -> None:
        """Count and log one refused model or model message; the old model keeps serving."""
        self.stats.refused[reason] += 1
        self.metrics.refused.labels(reason=reason).inc()
        event(
            log,
            "model.refused",
            level=logging.WARNING,
            reason=reason,
            version=version,
            serving=self.current.version if self.current else None,
            detail=detail,
        )

    # ------------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Serve until the rows end (a finite source) or :meth:`stop` is called."""
        cfg = self.cfg
        self._http = self.metrics.serve(cfg.metrics, cfg.file)
        event(log, "infer.starting", site=cfg.line.site, source=self.origin, row_shape=list(self.row_shape))
        event(
            log,
            "canary.on" if self.canary_on else "canary.off",
            rows=cfg.line.canary.rows,
            min_rows=cfg.line.canary.min_rows,
            margin=cfg.line.canary.margin,
            why="labelled rows"
            if self.canary_on
            else ("[line.canary] enabled = false" if not cfg.line.canary.enabled else "[rows] has no label"),
        )
        async with contextlib.AsyncExitStack() as stack:
            fed_client = out_client = None
            if self.origin == "manifest":
                fed_client = await stack.enter_async_context(self._client(cfg.broker, "broker", "infer", liveness=True))
            if cfg.output.topic or cfg.output.alarm_topic or cfg.line.command_topic:
                if cfg.output.broker is None and fed_client is not None:
                    out_client = fed_client
                else:
                    out_client = await stack.enter_async_context(
                        self._client(cfg.output.broker or cfg.broker, "output.broker", "infer-out")
                    )
            tasks: list[asyncio.Task[Any]] = []
            try:
                await self._restore()
                if out_client is not None and (cfg.output.topic or cfg.output.alarm_topic):
                    spool = None
                    if cfg.output.spool:
                        from edge.inference.spool import PredictionSpool

                        spool = PredictionSpool(
                            Path(cfg.path(cfg.line.state_dir)) / "mqtt-spool.sqlite",
                            cfg.output.queue_max,
                            int(cfg.output.spool_max_mb * 1024 * 1024),
                        )
                        stack.callback(spool.close)
                    self._mqtt_out = MqttSink(
                        out_client,
                        cfg.output.topic,
                        cfg.output.alarm_topic,
                        cfg.output.qos,
                        cfg.output.queue_max,
                        spool=spool,
                    )
                    tasks.append(asyncio.create_task(self._mqtt_out.run(), name="infer:mqtt-out"))
                tasks.append(asyncio.create_task(self._load_loop(), name="infer:loader"))
                tasks.append(asyncio.create_task(self._rollback_poll(), name="infer:rollback"))
                if self.origin == "manifest":
                    assert fed_client is not None
                    tasks.append(asyncio.create_task(self._watch_manifest(fed_client), name="infer:manifest"))
                else:
                    tasks.append(asyncio.create_task(self._watch_model_dir(), name="infer:model-dir"))
                if cfg.line.command_topic and out_client is not None:
                    if out_client is fed_client and self.origin == "manifest":
                        assert fed_client is not None
                        await fed_client.subscribe(cfg.line.command_topic, 1)  # routed by _watch_manifest
                    else:
                        tasks.append(asyncio.create_task(self._watch_commands(out_client), name="infer:cmd"))
                reader = asyncio.create_task(self._read_rows(), name="infer:reader")
                scorer = asyncio.create_task(self._score_loop(), name="infer:scorer")
                stopper = asyncio.create_task(self._stopping.wait())
                await asyncio.wait([scorer, stopper], return_when=asyncio.FIRST_COMPLETED)
                for t in (reader, stopper):
                    t.cancel()
                if not scorer.done():
                    scorer.cancel()
                await asyncio.gather(reader, scorer, stopper, return_exceptions=True)
                if scorer.done() and not scorer.cancelled() and scorer.exception() is not None:
                    raise scorer.exception()  # type: ignore[misc]
                if self._mqtt_out is not None:
                    await self._mqtt_out.drain(timeout=5.0)
                if self.rows_error is not None:
                    raise self.rows_error
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if self.current is not None:  # a swap's own save may have been cancelled with its loop
                    with contextlib.suppress(OSError):
                        await self._persist()
                if self._liveness is not None and fed_client is not None:
                    with contextlib.suppress(Exception):  # best effort: the will covers a lost link
                        await asyncio.wait_for(self._liveness.stopped(fed_client), 5)
                if self._sink is not None:
                    self._sink.close()
                self._http.stop()
        event(
            log,
            "infer.stopped",
            rows=self.stats.rows,
            predictions=self.stats.predictions,
            version=self.current.version if self.current else None,
            swaps=len(self.stats.swaps),
            refused=dict(self.stats.refused),
        )

    def _client(self, table: dict[str, Any] | None, where: str, suffix: str, liveness: bool = False) -> Any:
        """A client for ``table``; on the federation broker (``liveness``) it keeps the line's retained
        ``services/<user>/status`` with a last will (see :mod:`broker_bridge.liveness`)."""
        from broker_bridge.client import MqttClient
        from broker_bridge.liveness import Liveness

        assert table is not None
        settings = broker_settings(table, self.cfg.file, where, client_id=f"{self.cfg.line.site}-{suffix}")
        if not liveness:
            return MqttClient(settings)
        self._liveness = Liveness(self.topics, settings.username or f"{self.cfg.line.site}.line", "line")
        self._liveness.version = self.current.version if self.current else None
        client = MqttClient(settings, will=self._liveness.will(), on_connect=self._liveness.online)
        self._fed_client = client
        return client

    # ------------------------------------------------------------------ rows
    async def _rows(self) -> AsyncIterator[Any]:
        if self._rows_in is not None:
            async for row in self._rows_in:
                yield row
            return
        from firmware_adapters import build_sources
        from firmware_adapters.rows import parse_row_mapping
        from firmware_adapters.stream import row_stream

        cfg = self.cfg
        sources = build_sources(cfg.sources, file=cfg.file)
        # a broken source ends the line's rows (no on_source_error); historical (backfilled) rows are not scored
        async for row in row_stream(sources, parse_row_mapping(cfg.rows, file=cfg.file), file=cfg.file, live_only=True):
            yield row

    async def _read_rows(self) -> None:
        """Number and queue every row; at the end of the rows (or a source failure) queue the end mark."""
        try:
            async for row in self._rows():
                await self._queue.put((self._seq, row, time.perf_counter()))
                self._seq += 1
                self.stats.rows += 1
        except asyncio.CancelledError:
            raise  # shutting down: nothing more is scored, so there is no end mark to wait for
        except Exception as exc:  # a source that fails outright ends the service with its error
            self.rows_error = exc
            event(log, "rows.failed", level=logging.ERROR, error=f"{type(exc).__name__}: {exc}")
        await self._queue.put(_END)

    # ------------------------------------------------------------------ scoring
    async def _score_loop(self) -> None:
        await self.ready.wait()
        bmax = self.cfg.line.batch_max
        threshold = self.cfg.output.threshold
        while True:
            first = await self._queue.get()
            if first is _END:
                return
            batch = [first]
            while len(batch) < bmax:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if item is _END:
                    self._queue.put_nowait(_END)  # seen again after this batch
                    break
                batch.append(item)
            model = self.current  # read once: the whole batch is scored by this version
            assert model is not None
            self._score_batch(model, batch, threshold)
            await asyncio.sleep(0)  # let a pending swap or the watchers run between batches

    def _score_batch(self, model: LoadedModel, batch: list[tuple[int, Any, float]], threshold: float | None) -> None:
        t0 = time.perf_counter()
        try:
            x = np.stack([np.asarray(r.x, dtype=np.float32) for _, r, _ in batch])
            scores: list[float | None] = [float(s) for s in model.score(x)]
        except Exception:  # a bad row, or a model that fails on live rows: score one by one
            scores = [self._score_one(model, seq, row) for seq, row, _ in batch]
        t1 = time.perf_counter()
        version = model.version
        model_id = model.info.hash[:12]
        records = []
        for (seq, row, _queued), score in zip(batch, scores):
            rec: dict[str, Any] = {"seq": seq, "ts": row.ts, "score": score, "version": version, "model": model_id}
            if threshold is not None and score is not None:
                rec["alarm"] = score >= threshold
                if rec["alarm"]:
                    self.stats.alarms += 1
                    self.metrics.alarms.inc()
            if row.y is not None:
                rec["label"] = row.y
                self._canary.append((np.asarray(row.x, dtype=np.float32), float(row.y)))
            records.append(rec)
        self._next_scored = batch[-1][0] + 1
        if self._sink is not None:
            self._sink.write(records)
        if self._mqtt_out is not None:
            dropped = self._mqtt_out.put(records)
            if dropped:
                self.metrics.output_dropped.inc(dropped)
        if self._on_predictions is not None:
            self._on_predictions(records)
        if log.isEnabledFor(logging.DEBUG):
            event(log, "scored", level=logging.DEBUG, first_seq=batch[0][0], rows=len(batch), version=version)
        done = time.perf_counter()
        self.stats.predictions += len(records)
        self.stats.batches += 1
        self.stats.batch_latency.append((len(batch), t1 - t0))
        self.stats.row_latency.extend(done - q for _, _, q in batch)
        self.metrics.predictions.inc(len(records))
        self.metrics.batch_seconds.observe(t1 - t0)
        self.metrics.queue.set(self._queue.qsize())
        good = [s for s in scores if s is not None]
        if good:
            self.metrics.score.set(good[-1])
            for s in good:
                self.metrics.scores.observe(s)

    def _score_one(self, model: LoadedModel, seq: int, row: Any) -> float | None:
        """Score one row; None (counted, logged, still emitted) when it cannot be scored."""
        try:
            x = np.asarray(row.x, dtype=np.float32)
            if x.shape != self.row_shape:
                raise ValueError(f"row has shape {list(x.shape)}, the model reads {list(self.row_shape)}")
            return float(model.score(x[None])[0])
        except Exception as exc:
            self.stats.score_errors += 1
            self.metrics.score_errors.inc()
            event(log, "score.failed", level=logging.ERROR, seq=seq, version=model.version, error=str(exc))
            return None

    # ------------------------------------------------------------------ swapping
    def _swap(self, new: LoadedModel, kind: str, previous: LoadedModel | None) -> Swap:
        """Put ``new`` in service. Runs on the loop between batches: one reference assignment."""
        old = self.current
        self.current, self.previous = new, previous
        seconds = time.monotonic() - new.info.seen_at if kind == "reload" and new.info.seen_at else 0.0
        swap = Swap(new.version, old.version if old else None, self._next_scored, seconds, kind)
        self.stats.swaps.append(swap)
        self.metrics.swaps.inc()
        self.metrics.version.set(new.version)
        self._served(new.info.meta.get("served"))
        if self._liveness is not None:  # tell the federation which version serves (no plant data)
            task = asyncio.get_running_loop().create_task(self._liveness.set_version(self._fed_client, new.version))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        if kind == "reload":
            self.metrics.swap_seconds.set(seconds)
        self.ready.set()
        event(
            log,
            "model.swapped",
            kind=kind,
            version=new.version,
            previous=swap.previous,
            first_seq=swap.first_seq,
            swap_ms=round(seconds * 1000, 2),
            origin=new.info.origin,
            served=(self.stats.served or {}).get("kind"),
            validation_metric=(self.stats.served or {}).get("validation_metric"),
        )
        return swap

    def _report_refused(self, refused: dict[str, Any]) -> None:
        """Say on the line's retained status which version it refused as too far a step, and stays behind."""
        self.model_refused = refused
        if self._liveness is not None:
            self._liveness.model_refused = refused
            task = asyncio.get_running_loop().create_task(
                self._liveness.set_version(self._fed_client, self._liveness.version)
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _served(self, served: Any) -> None:
        """The line's status: which candidate its site picked and that candidate's validation metric."""
        self.metrics.served.clear()
        if not isinstance(served, dict) or not isinstance(served.get("kind"), str):
            self.stats.served = None
            return
        self.stats.served = {
            "kind": served["kind"],
            "metric": served.get("metric"),
            "validation_metric": served.get("validation_metric"),
            "reason": served.get("reason"),
        }
        v = served.get("validation_metric")
        if isinstance(v, (int, float)):
            self.metrics.served.labels(kind=served["kind"], metric=str(served.get("metric"))).set(float(v))

    def _serving(self) -> Serving:
        def saved(m: LoadedModel | None) -> SavedModel | None:
            if m is None:
                return None
            return self.state.save_model(m.version, m.info.hash, m.blob, m.info.origin)

        return Serving(saved(self.current), saved(self.previous), self.blocked_version, tuple(self._blocked))

    async def _persist(self) -> None:
        serving = await asyncio.to_thread(self._serving)
        await asyncio.to_thread(self.state.save, serving)

    async def _restore(self) -> None:
        """Serve the model saved in the state dir at once (a restart must not wait for the broker)."""
        serving = self.state.load()
        self.blocked_version = serving.blocked_version
        self._blocked = list(serving.blocked)
        self._failed.update(serving.blocked)
        loaded: list[LoadedModel | None] = []
        for saved in (serving.current, serving.previous):
            model = None
            if saved is not None and saved.origin == self.origin:
                blob = self.state.read_model(saved)
                if blob is not None and content_hash(blob) == saved.hash:
                    info = ModelInfo(saved.version, saved.hash, saved.origin, {"restored": True})
                    try:
                        model = await asyncio.to_thread(
                            build_model, blob, info, self.row_shape, threads=self.cfg.line.threads
                        )
                    except ModelRefused as exc:
                        self.refuse(exc.reason, f"saved model: {exc.detail}", saved.version)
            loaded.append(model)
        cur, prev = loaded
        if cur is None and prev is not None:
            cur, prev = prev, None
        if cur is not None:
            self._swap(cur, "restore", prev)
        if self.state.rollback_requested():
            await self.rollback("request file at start")

    async def rollback(self, why: str) -> bool:
        """Put the previous good version back in service; refuse the current one from now on."""
        self.state.clear_rollback_request()
        if self.previous is None or self.current is None:
            event(
                log,
                "rollback.unavailable",
                level=logging.WARNING,
                why=why,
                serving=self.current.version if self.current else None,
            )
            return False
        bad = self.current
        self.blocked_version = max(self.blocked_version, bad.version)
        self._failed.add((bad.version, bad.info.hash))
        self._blocked.append((bad.version, bad.info.hash))
        self._swap(self.previous, "rollback", None)
        event(
            log, "rollback.done", why=why, version=self.current.version if self.current else None, blocked=bad.version
        )
        await self._persist()
        return True

    async def _rollback_poll(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.line.poll_s)
            if self.state.rollback_requested():
                await self.rollback("request file")

    async def _load_loop(self) -> None:
        """Take offered versions one at a time (newest wins), prepare off the loop, swap on it."""
        while True:
            cand = await self._candidates.get()
            while not self._candidates.empty():  # a newer offer supersedes one not yet started
                newer = self._candidates.get_nowait()
                if newer.info.version >= cand.info.version:
                    event(log, "model.superseded", version=cand.info.version, by=newer.info.version)
                    cand = newer
            if not self.is_new(cand.info.version, cand.info.hash):
                continue
            old = self.current
            recent = np.stack([x for x, _ in self._canary]) if self._canary else None
            labels = np.asarray([y for _, y in self._canary], dtype=np.float64) if self._canary else None
            try:
                new = await asyncio.to_thread(self._prepare, cand, old, recent, labels)
            except ModelRefused as exc:
                self._failed.add((cand.info.version, cand.info.hash))
                self.refuse(exc.reason, exc.detail, cand.info.version)
                if exc.reason == "step":  # public in the line's status, like a site's (models.step_bound)
                    self._report_refused({"version": cand.info.version, "reason": "step"})
                continue
            except Exception as exc:  # anything unforeseen refuses the model, never the service
                self._failed.add((cand.info.version, cand.info.hash))
                self.refuse("probe", f"version {cand.info.version}: {type(exc).__name__}: {exc}", cand.info.version)
                continue
            if not self.is_new(cand.info.version, cand.info.hash):
                continue  # a rollback blocked it meanwhile
            self._swap(new, "reload", self.current if self.current is not None else None)
            await self._persist()

    def _prepare(
        self, cand: Candidate, old: LoadedModel | None, recent: np.ndarray | None, labels: np.ndarray | None
    ) -> LoadedModel:
        """Worker thread: build, probe and (when possible) canary-check a candidate."""
        new = build_model(cand.blob, cand.info, self.row_shape, threads=self.cfg.line.threads, recent=recent)
        if self.origin == "manifest" and old is not None and old.info.origin == "manifest":
            from edge.inference.onnx_params import check_step  # (onnx parses the model once more)

            check_step(self.cfg.line.adopt, old.blob, old.version, cand.blob, cand.info.version)
        canary = self.cfg.line.canary
        if not self.canary_on or old is None:
            return new
        n = 0 if labels is None else len(labels)
        if n < canary.min_rows:
            event(log, "canary.skipped", version=new.version, labelled_rows=n, min_rows=canary.min_rows)
            return new
        assert recent is not None and labels is not None
        result = canary_check(new, old, recent, labels, self.task, canary.margin)
        event(
            log,
            "canary.passed",
            version=new.version,
            rows=result.rows,
            old_loss=round(result.old_loss, 5),
            new_loss=round(result.new_loss, 5),
            against=old.version,
        )
        return new

    def offer(self, info: ModelInfo, blob: bytes) -> None:
        """Hand a new version to the loader (watchers call this)."""
        self._candidates.put_nowait(Candidate(info, blob))

    # ------------------------------------------------------------------ watchers
    def _aggregator_sign_pub(self) -> bytes:
        from broker_bridge.keys import Enrollment, PublicKeys

        line = self.cfg.line
        if line.enrollment:
            return Enrollment.load(self.cfg.path(line.enrollment)).aggregator.sign_pub
        assert line.aggregator_key
        return PublicKeys.load(self.cfg.path(line.aggregator_key)).sign_pub

    def _site_keys(self) -> Any:
        from broker_bridge.keys import KeyPair

        assert self.cfg.line.site_key
        keys = KeyPair.load(self.cfg.path(self.cfg.line.site_key))
        if keys.ident != self.cfg.line.site or keys.role != "site":
            raise ValueError(
                f"{self.cfg.line.site_key}: a key of {keys.role} {keys.ident!r}, not of site {self.cfg.line.site!r}"
            )
        return keys

    async def _watch_manifest(self, client: Any) -> None:
        from edge.inference.manifest import ManifestWatcher

        watcher = ManifestWatcher(
            self.topics,
            self._aggregator_sign_pub(),
            self._site_keys(),
            self.current_version,
            self.refuse,
            max_bytes=self.cfg.line.max_model_bytes,
        )
        for flt in watcher.filters():
            await client.subscribe(flt, 1)
        cmd = self.cfg.line.command_topic
        async for msg in client.messages():
            if cmd and msg.topic == cmd:
                await self._command(msg.payload)
                continue
            try:
                fetched = watcher.handle(msg.topic, msg.payload)
            except Exception as exc:  # a malformed message must never end the watcher
                self.refuse("schema", f"message on {msg.topic!r}: {type(exc).__name__}: {exc}", None)
                continue
            if fetched is not None:
                self.offer(
                    ModelInfo(
                        fetched.version,
                        fetched.hash,
                        "manifest",
                        {"created_at": fetched.manifest.get("created_at")},
                        fetched.seen_at,
                    ),
                    fetched.blob,
                )

    async def _watch_model_dir(self) -> None:
        model_dir = self.cfg.path(self.cfg.line.model_dir or ".")
        reported: set[Any] = set()
        offered: set[tuple[int, str]] = set()
        while True:
            try:
                await self._poll_model_dir(model_dir, reported, offered)
            except OSError as exc:  # unreadable folder or file: say so, keep polling
                if repr(exc) not in reported:
                    reported.add(repr(exc))
                    event(log, "model_dir.unreadable", level=logging.WARNING, path=str(model_dir), error=str(exc))
            await asyncio.sleep(self.cfg.line.poll_s)

    async def _poll_model_dir(self, model_dir: Path, reported: set[Any], offered: set[tuple[int, str]]) -> None:
        """One look at ``current.json``: offer a new, intact version to the loader."""
        try:
            ptr = await asyncio.to_thread(read_pointer, model_dir)
        except ModelDirError as exc:
            if str(exc) not in reported:
                reported.add(str(exc))
                self.refuse("schema", str(exc), None)
            ptr = None
        if ptr is not None and self.is_new(ptr.version, ptr.hash):
            seen = time.monotonic()
            blob = await asyncio.to_thread(read_model, model_dir, ptr)
            if blob is None:
                pass  # replaced meanwhile: read the new pointer next time
            elif content_hash(blob) != ptr.hash:
                if (ptr.version, ptr.hash, "hash") not in reported:  # retried each poll, reported once
                    reported.add((ptr.version, ptr.hash, "hash"))
                    self.refuse(
                        "hash",
                        f"{model_dir / ptr.file} ({len(blob)} bytes) does not match the hash in current.json",
                        ptr.version,
                    )
            elif (ptr.version, ptr.hash) not in offered:  # offered once; the loader decides
                offered.add((ptr.version, ptr.hash))
                self.offer(ModelInfo(ptr.version, ptr.hash, "model_dir", ptr.meta, seen), blob)

    async def _watch_commands(self, client: Any) -> None:
        await client.subscribe(self.cfg.line.command_topic, 1)
        async for msg in client.messages():
            if msg.topic == self.cfg.line.command_topic:
                await self._command(msg.payload)

    def _command_verifier(self) -> Any:
        """Who may command this line: its site's key and the aggregator's (whichever are configured)."""
        from broker_bridge.line_command import CommandVerifier

        if self._verifier is None:
            line = self.cfg.line
            signers = {}
            if line.site_key:
                signers["site"] = bytes(self._site_keys().signing_key.verify_key)
            if line.enrollment or line.aggregator_key:
                signers["aggregator"] = self._aggregator_sign_pub()
            self._verifier = CommandVerifier(signers, line.federation, line.site)
        return self._verifier

    async def _command(self, payload: bytes) -> None:
        """A signed command (``fedline keys command``); unsigned or replayed ones are refused and counted."""
        from broker_bridge.errors import WireError

        try:
            signer, _ = self._command_verifier().verify(payload)
        except WireError as exc:
            self.refuse("command", f"command refused ({exc.reason}): {exc.detail}", None)
            return
        await self.rollback(f"command topic, signed by the {signer}")


async def run_service(cfg: InferConfig) -> InferenceService:
    """Build and run a service until its rows end or SIGINT/SIGTERM."""
    import signal

    if not cfg.sources:
        from fedline.config import ConfigError

        raise ConfigError(cfg.file, "sources", "at least one [[sources]] table is needed (where rows come from)")
    service = InferenceService(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, service.stop)
    await service.run()
    return service


__all__ = ["Candidate", "InferenceService", "ServiceStats", "Swap", "row_shape", "run_service"]
