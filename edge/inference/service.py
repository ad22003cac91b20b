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

Each is a small class in its own module: the reader and scorer in ``edge.inference.scoring``, the loader
(swaps, restore, rollback) in ``edge.inference.loader``, the watchers in ``edge.inference.watchers``. This
module is the wiring: the clients, the output sinks, the tasks, and an orderly stop.

The service imports onnxruntime and numpy, never torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from broker_bridge.topics import Topics
from edge.inference.config import InferConfig, broker_settings
from edge.inference.loader import Candidate, Loader, LoaderHooks
from edge.inference.outputs import Metrics, MqttSink
from edge.inference.scoring import Scorer
from edge.inference.session import LoadedModel, ModelInfo
from edge.inference.state import StateDir
from edge.inference.stats import ServiceStats, Swap
from edge.inference.watchers import Watchers
from fedline.logs import event

log = logging.getLogger("fedline.infer")


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
        from firmware_adapters.rows import parse_row_mapping

        self.cfg = cfg
        line = cfg.line
        self.topics = Topics(line.federation, line.topic_prefix)
        self.row_shape = row_shape(cfg.rows, cfg.file)
        mapping = parse_row_mapping(cfg.rows, file=cfg.file)
        self.task = mapping.task
        # the canary is on wherever the rows carry a label ([rows] label), unless [line.canary] enabled = false
        self.canary_on = line.canary.enabled and mapping.label is not None
        self.state = StateDir(cfg.path(line.state_dir))
        self.metrics = Metrics()
        self.stats = ServiceStats()
        self.origin = line.model_source
        self.model_refused: dict[str, Any] | None = None  # the last version refused as too far a step
        self.scorer = Scorer(cfg, self.row_shape, self.stats, self.metrics, lambda: self.current, rows, on_predictions)
        hooks = LoaderHooks(lambda: self.scorer.next_scored, self.scorer.canary_rows, self._tell_version, self._refused)
        self.loader = Loader(
            cfg, self.row_shape, self.task, self.canary_on, self.state, self.stats, self.metrics, hooks
        )
        self.watchers = Watchers(cfg, self.topics, self.loader)
        self._stopping = asyncio.Event()
        self._http: Any = None
        self._liveness: Any = None  # broker_bridge.liveness.Liveness when following the federation broker
        self._fed_client: Any = None
        self._background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ what callers read
    @property
    def current(self) -> LoadedModel | None:
        """The model in service."""
        return self.loader.current

    @property
    def previous(self) -> LoadedModel | None:
        """The previous good model (what a rollback puts back)."""
        return self.loader.previous

    @property
    def ready(self) -> asyncio.Event:
        """Set once a model serves."""
        return self.loader.ready

    @property
    def rows_error(self) -> BaseException | None:
        """The error that ended the rows, if a source failed outright."""
        return self.scorer.rows_error

    def current_version(self) -> int:
        """Newest version this line has served or refused by rollback (watchers offer only newer)."""
        return self.loader.current_version()

    def is_new(self, version: int, blob_hash: str) -> bool:
        """Whether an offered model should be tried (``Loader.is_new``)."""
        return self.loader.is_new(version, blob_hash)

    def refuse(self, reason: str, detail: str, version: int | None) -> None:
        """Count and log one refused model or model message; the old model keeps serving."""
        self.loader.refuse(reason, detail, version)

    def offer(self, info: ModelInfo, blob: bytes) -> None:
        """Hand a new version to the loader."""
        self.loader.offer(info, blob)

    async def rollback(self, why: str) -> bool:
        """Put the previous good version back in service; refuse the current one from now on."""
        return await self.loader.rollback(why)

    # ------------------------------------------------------------------ the federation's view of this line
    def _background_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _tell_version(self, version: int) -> None:
        """Tell the federation which version serves (no plant data)."""
        if self._liveness is not None:
            self._background_task(self._liveness.set_version(self._fed_client, version))

    def _refused(self, refused: dict[str, Any]) -> None:
        """Say on the line's retained status which version it refused as too far a step, and stays behind."""
        self.model_refused = refused
        if self._liveness is not None:
            self._liveness.model_refused = refused
            self._background_task(self._liveness.set_version(self._fed_client, self._liveness.version))

    # ------------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        """End :meth:`run` (after the batch being scored)."""
        self._stopping.set()

    async def run(self) -> None:
        """Serve until the rows end (a finite source) or :meth:`stop` is called."""
        self._http = self.metrics.serve(self.cfg.metrics, self.cfg.file)
        self._announce()
        async with contextlib.AsyncExitStack() as stack:
            fed_client, out_client = await self._open_clients(stack)
            tasks: list[asyncio.Task[Any]] = []
            try:
                await self.loader.restore()
                tasks += await self._start(stack, fed_client, out_client)
                await self._serve()
            finally:
                await self._shut_down(tasks, fed_client)
        event(
            log,
            "infer.stopped",
            rows=self.stats.rows,
            predictions=self.stats.predictions,
            version=self.current.version if self.current else None,
            swaps=len(self.stats.swaps),
            refused=dict(self.stats.refused),
            out_of_range=self.stats.out_of_range,
        )

    def _announce(self) -> None:
        cfg = self.cfg
        canary = cfg.line.canary
        event(log, "infer.starting", site=cfg.line.site, source=self.origin, row_shape=list(self.row_shape))
        event(
            log,
            "canary.on" if self.canary_on else "canary.off",
            rows=canary.rows,
            min_rows=canary.min_rows,
            margin=canary.margin,
            why="labelled rows"
            if self.canary_on
            else ("[line.canary] enabled = false" if not canary.enabled else "[rows] has no label"),
        )

    async def _open_clients(self, stack: contextlib.AsyncExitStack) -> tuple[Any, Any]:
        """The federation broker's client (manifest lines) and the output's (the same one unless configured)."""
        cfg = self.cfg
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
        return fed_client, out_client

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

    def _start_output(self, stack: contextlib.AsyncExitStack, out_client: Any) -> MqttSink:
        """The MQTT prediction sink, spooled to disk for plant-broker outages when ``[output] spool``."""
        cfg = self.cfg
        spool = None
        if cfg.output.spool:
            from edge.inference.spool import PredictionSpool

            spool = PredictionSpool(
                Path(cfg.path(cfg.line.state_dir)) / "mqtt-spool.sqlite",
                cfg.output.queue_max,
                int(cfg.output.spool_max_mb * 1024 * 1024),
            )
            stack.callback(spool.close)
        return MqttSink(
            out_client, cfg.output.topic, cfg.output.alarm_topic, cfg.output.qos, cfg.output.queue_max, spool=spool
        )

    async def _start(
        self, stack: contextlib.AsyncExitStack, fed_client: Any, out_client: Any
    ) -> list[asyncio.Task[Any]]:
        """The background tasks: the output, the loader, the rollback poll, the watchers."""
        cfg = self.cfg
        tasks: list[asyncio.Task[Any]] = []
        if out_client is not None and (cfg.output.topic or cfg.output.alarm_topic):
            self.scorer.mqtt_out = self._start_output(stack, out_client)
            tasks.append(asyncio.create_task(self.scorer.mqtt_out.run(), name="infer:mqtt-out"))
        tasks.append(asyncio.create_task(self.loader.loop(), name="infer:loader"))
        tasks.append(asyncio.create_task(self.loader.rollback_poll(), name="infer:rollback"))
        if self.origin == "manifest":
            assert fed_client is not None
            tasks.append(asyncio.create_task(self.watchers.manifest(fed_client), name="infer:manifest"))
        else:
            tasks.append(asyncio.create_task(self.watchers.model_dir(), name="infer:model-dir"))
        if cfg.line.command_topic and out_client is not None:
            if out_client is fed_client and self.origin == "manifest":
                assert fed_client is not None
                await fed_client.subscribe(cfg.line.command_topic, 1)  # routed by the manifest watcher
            else:
                tasks.append(asyncio.create_task(self.watchers.commands(out_client), name="infer:cmd"))
        return tasks

    async def _serve(self) -> None:
        """Read and score until the scorer ends (the rows ended) or :meth:`stop`; then drain the MQTT output.

        Why not ``fedline.supervise``: the scorer ends on its own with a finite source, which is a normal end.
        """
        reader = asyncio.create_task(self.scorer.read(), name="infer:reader")
        scorer = asyncio.create_task(self.scorer.loop(self.loader.ready), name="infer:scorer")
        stopper = asyncio.create_task(self._stopping.wait())
        await asyncio.wait([scorer, stopper], return_when=asyncio.FIRST_COMPLETED)
        for t in (reader, stopper):
            t.cancel()
        if not scorer.done():
            scorer.cancel()
        await asyncio.gather(reader, scorer, stopper, return_exceptions=True)
        if scorer.done() and not scorer.cancelled() and scorer.exception() is not None:
            raise scorer.exception()  # type: ignore[misc]
        if self.scorer.mqtt_out is not None:
            await self.scorer.mqtt_out.drain(timeout=5.0)
        if self.scorer.rows_error is not None:
            raise self.scorer.rows_error

    async def _shut_down(self, tasks: list[asyncio.Task[Any]], fed_client: Any) -> None:
        """Stop the tasks, save the model in service, say offline, close the file and the metrics."""
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.current is not None:  # a swap's own save may have been cancelled with its loop
            with contextlib.suppress(OSError):
                await self.loader.persist()
        if self._liveness is not None and fed_client is not None:
            with contextlib.suppress(Exception):  # best effort: the will covers a lost link
                await asyncio.wait_for(self._liveness.stopped(fed_client), 5)
        if self.scorer.sink is not None:
            self.scorer.sink.close()
        self._http.stop()


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


__all__ = [
    "Candidate",
    "InferenceService",
    "ServiceStats",
    "Swap",
    "row_shape",
    "run_service",
]  # (their homes: loader, stats)
