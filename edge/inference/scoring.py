"""The line's reader and scorer: rows numbered and queued, then scored in batches by one model each.

Why a batch reads the model reference once: nothing else runs on the loop while a batch is scored, so a swap
(one assignment on the loop, ``edge.inference.loader``) always falls between two batches: no row is scored
twice, none is skipped, and each score comes from the version current when it was scored. A full queue holds
the source back rather than dropping rows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np

from edge.inference.config import InferConfig
from edge.inference.outputs import JsonlSink, Metrics, MqttSink
from edge.inference.session import LoadedModel
from edge.inference.stats import ServiceStats
from fedline.logs import event

log = logging.getLogger("fedline.infer")

_END = object()  # queued after the last row

Queued = tuple[int, Any, float]  # (seq, row, when it was queued)


class Scorer:
    """Reads rows (:meth:`read`) and scores them (:meth:`loop`) with whatever ``model()`` serves at each batch.

    ``rows`` replaces the configured sources with any async iterator of rows (tests, the benchmark); the
    sinks get every prediction: the JSON-lines file, ``mqtt_out`` (set once its client is up) and
    ``on_predictions``.
    """

    def __init__(
        self,
        cfg: InferConfig,
        row_shape: tuple[int, ...],
        stats: ServiceStats,
        metrics: Metrics,
        model: Callable[[], LoadedModel | None],
        rows: AsyncIterator[Any] | None = None,
        on_predictions: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self.cfg, self.row_shape, self.stats, self.metrics = cfg, row_shape, stats, metrics
        self._model = model
        self._rows_in = rows
        self._on_predictions = on_predictions
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=cfg.line.queue_max)
        self.seq = 0  # next seq the reader hands out
        self.next_scored = 0  # seq of the next row the scorer will score
        self.canary: deque[tuple[np.ndarray, float]] = deque(maxlen=cfg.line.canary.rows)  # recent labelled rows
        self.rows_error: BaseException | None = None
        self.sink = (
            JsonlSink(
                cfg.path(cfg.output.file), max_bytes=int(cfg.output.file_max_mb * 2**20), keep=cfg.output.file_keep
            )
            if cfg.output.file
            else None
        )
        self.mqtt_out: MqttSink | None = None

    def canary_rows(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The recent labelled rows and their labels, for the loader's canary (None, None: none yet)."""
        if not self.canary:
            return None, None
        recent = np.stack([x for x, _ in self.canary])
        return recent, np.asarray([y for _, y in self.canary], dtype=np.float64)

    # ------------------------------------------------------------------ reading
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
        stream = row_stream(sources, parse_row_mapping(cfg.rows, file=cfg.file), file=cfg.file, live_only=True)
        async for row in stream:
            self._out_of_range(stream.builder.stats.out_of_range)
            yield row

    def _out_of_range(self, total: int) -> None:
        """Count the values the RowBuilder clamped to their range; warn on the first (a PLC tag outside its
        engineering range is a sensor fault, or an input crafted to reach where no training row was)."""
        new = total - self.stats.out_of_range
        if new <= 0:
            return
        if self.stats.out_of_range == 0:
            event(log, "rows.out_of_range", level=logging.WARNING, row=self.stats.rows, values=new)
        self.stats.out_of_range = total
        self.metrics.out_of_range.inc(new)

    async def read(self) -> None:
        """Number and queue every row; at the end of the rows (or a source failure) queue the end mark."""
        try:
            async for row in self._rows():
                await self.queue.put((self.seq, row, time.perf_counter()))
                self.seq += 1
                self.stats.rows += 1
        except asyncio.CancelledError:
            raise  # shutting down: nothing more is scored, so there is no end mark to wait for
        except Exception as exc:  # a source that fails outright ends the service with its error
            self.rows_error = exc
            event(log, "rows.failed", level=logging.ERROR, error=f"{type(exc).__name__}: {exc}")
        await self.queue.put(_END)

    # ------------------------------------------------------------------ scoring
    async def loop(self, ready: asyncio.Event) -> None:
        """Once a model serves (``ready``), score batches of up to ``batch_max`` queued rows until the end mark."""
        await ready.wait()
        threshold = self.cfg.output.threshold
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            model = self._model()  # read once: the whole batch is scored by this version
            assert model is not None
            self.score_batch(model, batch, threshold)
            await asyncio.sleep(0)  # let a pending swap or the watchers run between batches

    async def _next_batch(self) -> list[Queued] | None:
        """The rows queued now (at least one, waiting for it); None at the end of the rows."""
        first = await self.queue.get()
        if first is _END:
            return None
        batch = [first]
        while len(batch) < self.cfg.line.batch_max:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if item is _END:
                self.queue.put_nowait(_END)  # seen again after this batch
                break
            batch.append(item)
        return batch

    def score_batch(self, model: LoadedModel, batch: list[Queued], threshold: float | None) -> None:
        """Score one batch with one model and hand every prediction to the sinks."""
        t0 = time.perf_counter()
        try:
            x = np.stack([np.asarray(r.x, dtype=np.float32) for _, r, _ in batch])
            scores: list[float | None] = [float(s) for s in model.score(x)]
        except Exception:  # a bad row, or a model that fails on live rows: score one by one
            scores = [self._score_one(model, seq, row) for seq, row, _ in batch]
        t1 = time.perf_counter()
        records = self._records(model, batch, scores, threshold)
        self.next_scored = batch[-1][0] + 1
        self._emit(records)
        if log.isEnabledFor(logging.DEBUG):
            event(log, "scored", level=logging.DEBUG, first_seq=batch[0][0], rows=len(batch), version=model.version)
        self._count(batch, len(records), scores, t1 - t0)

    def _records(
        self, model: LoadedModel, batch: list[Queued], scores: list[float | None], threshold: float | None
    ) -> list[dict[str, Any]]:
        """One prediction per row, with the version and model that scored it; labelled rows feed the canary."""
        model_id = model.info.hash[:12]
        records = []
        for (seq, row, _queued), score in zip(batch, scores):
            rec: dict[str, Any] = {
                "seq": seq,
                "ts": row.ts,
                "score": score,
                "version": model.version,
                "model": model_id,
            }
            if threshold is not None and score is not None:
                rec["alarm"] = score >= threshold
                if rec["alarm"]:
                    self.stats.alarms += 1
                    self.metrics.alarms.inc()
            if row.y is not None:
                rec["label"] = row.y
                self.canary.append((np.asarray(row.x, dtype=np.float32), float(row.y)))
            records.append(rec)
        return records

    def _emit(self, records: list[dict[str, Any]]) -> None:
        if self.sink is not None:
            self.sink.write(records)
        if self.mqtt_out is not None:
            dropped = self.mqtt_out.put(records)
            if dropped:
                self.metrics.output_dropped.inc(dropped)
        if self._on_predictions is not None:
            self._on_predictions(records)

    def _count(self, batch: list[Queued], predictions: int, scores: list[float | None], seconds: float) -> None:
        done = time.perf_counter()
        self.stats.predictions += predictions
        self.stats.batches += 1
        self.stats.batch_latency.append((len(batch), seconds))
        self.stats.row_latency.extend(done - q for _, _, q in batch)
        self.metrics.predictions.inc(predictions)
        self.metrics.batch_seconds.observe(seconds)
        self.metrics.queue.set(self.queue.qsize())
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
