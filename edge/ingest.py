"""The edge agent's ingest task: samples from the configured sources → rows → the bounded local dataset.

Why a task of its own: sources are slow and fail on their own schedule (a PLC drops off, a historian replay
ends); ingest keeps storing what arrives, counts the new rows and wakes a round when enough are in, and a failed
source or a full disk is reported without taking the agent down.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from typing import Any

import numpy as np

from edge.dataset import UnitTracker
from edge.site_state import SiteState
from fedline.logs import event
from models import ModelSpec

log = logging.getLogger("fedline.edge")

BATCH_ROWS = 64  # rows stored in one transaction while a source has more ready

Example = tuple[np.ndarray, np.ndarray | None]


def example(spec: ModelSpec, row: Any) -> Example:
    """One row as the trainer's (input, target): a one-hot class, a repeated value, or no target (anomaly)."""
    if spec.task == "anomaly":
        return row.x, None
    y = float(row.y)
    if spec.task == "classification" and spec.n_outputs > 1:
        target = np.zeros(spec.n_outputs, np.float32)
        if 0 <= int(y) < spec.n_outputs:
            target[int(y)] = 1.0
        return row.x, target
    return row.x, np.full(spec.n_outputs, y, np.float32)


class _Batch:
    """Rows waiting to be stored together, with each row's unit and historical mark."""

    def __init__(self) -> None:
        self.rows: list[Example] = []
        self.groups: list[str | None] = []  # each row's unit ([dataset] group_column): a unit is held out whole
        self.late: list[bool] = []  # each row's historical mark (late data, e.g. Sparkplug is_historical)

    def add(self, row: Example, group: str | None, late: bool) -> None:
        self.rows.append(row)
        self.groups.append(group)
        self.late.append(late)

    def take(self) -> tuple[list[Example], list[str | None], list[bool]]:
        taken = self.rows, self.groups, self.late
        self.rows, self.groups, self.late = [], [], []
        return taken


class Ingest:
    """Reads every source until it ends; ``sources`` may be replaced before :meth:`run` (tests, benches)."""

    def __init__(self, state: SiteState, sources: list[Any]) -> None:
        self.state = state
        self.sources = sources

    async def run(self) -> None:
        """Store every row the sources give, in batches; a source's failure or end is reported, not raised."""
        from firmware_adapters.stream import row_stream

        st = self.state
        batch = _Batch()
        units = UnitTracker(st.cfg.dataset.group_column)

        def ended(src: Any) -> None:
            if batch.rows:
                self.store(*batch.take())
            if st.cfg.training.on_new_model and st.first_round_pending and st.new_rows:
                # a source's backlog is in (e.g. a historian replay): the first round starts now rather
                # than at the fallback timer; later rounds follow the federation's versions
                st.wake_train.set()

        def seen(sample: Any) -> None:
            st.metrics.samples.inc()
            if units.observe(sample.values):
                stream.builder.restart_window(sample.historical)  # a window never spans two units

        stream = row_stream(
            self.sources,
            st.mapping,
            file=st.cfg.file,
            on_source_error=self._failed,
            on_source_end=ended,
            on_sample=seen,
        )
        async for row in stream:
            if row.y is not None or st.spec.task == "anomaly":
                batch.add(example(st.spec, row), units.current, bool(row.historical))
            if batch.rows and (len(batch.rows) >= BATCH_ROWS or stream.pending == 0):
                self.store(*batch.take())
                # a backlog read at full speed (a historian replay) otherwise holds the loop for the whole
                # replay but a turn every few hundred rows: the connection, the grant, the manifest and a
                # recovery answer waited until it ended, and the first round after it (BENCHMARKS.md)
                await asyncio.sleep(0)
        if batch.rows:
            self.store(*batch.take())
        st.sources_done = True
        event(log, "sources.ended", site=st.site, stored=len(st.dataset), **stream.builder.stats.__dict__)

    def _failed(self, src: Any, exc: BaseException) -> None:
        """A source must not take the agent down: log it and keep the others running."""
        name = getattr(src, "name", "?")
        event(log, "source.failed", logging.ERROR, site=self.state.site, source=name, error=repr(exc))
        self.state.error(f"source {name}: {exc}")

    def store(self, batch: list[Example], groups: list[str | None], late: list[bool]) -> None:
        """Add rows to the dataset; wake a round at ``every_rows`` new rows. A write error drops these rows only."""
        st = self.state
        try:
            st.dataset.add_many(batch, groups=groups, historical=late)
        except sqlite3.Error as exc:  # e.g. "database or disk is full": drop these rows, keep running
            st.metrics.rows_lost.inc(len(batch))
            event(log, "dataset.write_failed", logging.ERROR, site=st.site, rows=len(batch), error=str(exc))
            st.error(f"dataset write failed: {exc}")
            return
        st.new_rows += len(batch)
        st.metrics.examples.inc(len(batch))
        st.metrics.examples_historical.inc(sum(late))
        st.metrics.rows.set(len(st.dataset))
        every_rows = st.cfg.training.every_rows
        if every_rows and st.new_rows >= every_rows:
            st.wake_train.set()
