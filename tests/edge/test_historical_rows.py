"""Rows made from samples marked historical (Sparkplug ``is_historical``: a device's store-and-forward after
an outage) are stored, trained on, and kept marked (issue 18): an operator can tell backfill from live rows."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator

import numpy as np
import pytest

from edge.agent import EdgeAgent
from edge.config import load_edge_config
from edge.dataset import Dataset
from firmware_adapters.sample import Sample, SourceStats
from tests.edge.helpers import Federation, write_csv, write_site


def test_marks_are_stored_and_an_older_store_gains_the_column(tmp_path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as con:  # the schema of the first release: no historical column
        con.executescript(
            "CREATE TABLE examples (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, x BLOB NOT NULL, "
            "y BLOB, holdout INTEGER NOT NULL);"
        )
        con.execute(
            "INSERT INTO examples (ts, x, y, holdout) VALUES (1.0, ?, ?, 0)",
            (np.zeros(2, np.float32).tobytes(), np.zeros(1, np.float32).tobytes()),
        )
    ds = Dataset(path, (2,), 1, max_rows=100, holdout_fraction=0.0, split="random")
    assert ds.historical_count() == 0 and len(ds) == 1  # the old row is kept, as live
    rows = [(np.full(2, i, np.float32), np.ones(1, np.float32)) for i in range(5)]
    ds.add_many(rows, historical=[True, False, True, True, False])
    assert ds.historical_count() == 3 and len(ds) == 6
    x, _ = ds.arrays()
    assert len(x) == 6  # historical rows are real measurements: trained on like the others
    with pytest.raises(ValueError, match="2 historical marks for 5 examples"):
        ds.add_many(rows, historical=[True, False])
    ds.close()
    reopened = Dataset(path, (2,), 1, max_rows=100, holdout_fraction=0.0, split="random")
    assert reopened.historical_count() == 3  # on disk, across a restart
    reopened.close()


class _Backfill:
    """A source that sends its live readings, then the readings it held through an outage, marked historical
    as a Sparkplug node does (the Sparkplug decoding of ``is_historical`` is tested on Tahu's vectors)."""

    name = "backfill"

    def __init__(self, live: int, late: int) -> None:
        self.stats = SourceStats()
        self.live, self.late = live, late

    async def __aiter__(self) -> AsyncIterator[Sample]:
        rng = np.random.default_rng(3)
        for i in range(self.live + self.late):
            values = {"temp": 300.0 + rng.normal(), "torque": 40.0, "speed": 2000.0, "label": float(i % 2)}
            yield Sample(ts=1_000.0 + i, source=self.name, values=values, historical=i >= self.live)
            await asyncio.sleep(0)


async def test_the_agent_stores_backfilled_rows_marked(tmp_path) -> None:
    fed = Federation.create(tmp_path, ["site-a"])
    path = write_site(fed, "site-a", write_csv(tmp_path / "rows.csv", 10), "mqtt://127.0.0.1:9", None)
    agent = EdgeAgent(load_edge_config(path))
    agent.ingest.sources = [_Backfill(live=70, late=30)]
    try:
        await asyncio.wait_for(agent.ingest.run(), 20)
        assert len(agent.dataset) == 100
        assert agent.dataset.historical_count() == 30
        assert agent.metrics.examples_historical._value.get() == 30
    finally:
        agent.close()
