"""row_stream: several sources into one stream of rows, with the caller's policy for a failing source."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from firmware_adapters import build_source
from firmware_adapters.rows import parse_row_mapping
from firmware_adapters.sample import Sample, SourceStats
from firmware_adapters.stream import Source, row_stream, source_ranges

MAPPING = parse_row_mapping({"features": [{"tag": "a", "range": [0.0, 10.0]}, {"tag": "b"}], "label": "y"})


class Scripted:
    """An in-process source that yields given samples, then ends or raises."""

    def __init__(self, name: str, samples: list[Sample], fail: Exception | None = None, ranges=None) -> None:
        self.name, self.stats, self._samples, self._fail = name, SourceStats(), samples, fail
        if ranges is not None:
            self.ranges = ranges

    async def __aiter__(self):
        for s in self._samples:
            await asyncio.sleep(0)
            yield s
        if self._fail is not None:
            raise self._fail


def smp(ts: float, historical: bool = False, **values) -> Sample:
    return Sample(ts=ts, source="t", values=values, historical=historical)


def write_csv(tmp_path: Path) -> Path:
    p = tmp_path / "line.csv"
    p.write_text("a,b,y\n1,0.5,0\n2,0.25,1\n")
    return p


async def test_a_real_csv_source_and_a_ranged_source_make_rows_then_end(tmp_path: Path) -> None:
    csv = build_source({"kind": "csv", "path": str(write_csv(tmp_path))})
    ranged = Scripted("plc", [Sample.bad("plc", "offline")], ranges=lambda: {"b": (0.0, 1.0)})  # b's range only
    assert isinstance(csv, Source) and isinstance(ranged, Source)
    ended, samples = [], []
    stream = row_stream([ranged, csv], MAPPING, on_source_end=lambda s: ended.append(s.name), on_sample=samples.append)
    rows = [r async for r in stream]
    assert sorted(ended) == ["csv", "plc"] and len(samples) == 3
    assert [r.y for r in rows] == [0.0, 1.0]  # a row per CSV line
    np.testing.assert_allclose(rows[-1].x, [0.2, 0.25])  # b normalised by the other source's range
    assert stream.builder.stats.rows == 2 and stream.pending == 0


async def test_a_failing_source_is_reported_and_the_others_go_on() -> None:
    bad = Scripted("bad", [smp(1.0, a=1.0)], fail=RuntimeError("device gone"))
    good = Scripted("good", [smp(2.0, a=5.0, b=1.0, y=1), smp(3.0, a=6.0, b=1.0, y=0)], ranges={"b": (0.0, 2.0)})
    errors = []
    rows = [
        r async for r in row_stream([bad, good], MAPPING, on_source_error=lambda s, e: errors.append((s.name, str(e))))
    ]
    assert errors == [("bad", "device gone")] and len(rows) == 2


async def test_without_a_policy_a_failing_source_ends_the_stream() -> None:
    bad = Scripted("bad", [], fail=RuntimeError("broken"))
    forever = Scripted("slow", [smp(float(i), a=1.0) for i in range(10_000)], ranges={"b": (0.0, 1.0)})
    with pytest.raises(RuntimeError, match="broken"):
        async for _ in row_stream([bad, forever], MAPPING):
            pass


async def test_live_only_drops_rows_made_from_historical_samples() -> None:
    src = Scripted(
        "sp", [smp(1.0, historical=True, a=1.0, b=1.0, y=0), smp(2.0, a=2.0, b=1.0, y=1)], ranges={"b": (0.0, 1.0)}
    )
    assert [r.historical async for r in row_stream([src], MAPPING)] == [True, False]
    src = Scripted("sp", src._samples, ranges={"b": (0.0, 1.0)})
    assert [r.ts async for r in row_stream([src], MAPPING, live_only=True)] == [2.0]


def test_source_ranges_merge_mappings_and_methods() -> None:
    assert source_ranges(
        [Scripted("x", [], ranges={"a": (0, 1)}), Scripted("y", [], ranges=lambda: {"b": (1, 2)}), Scripted("z", [])]
    ) == {"a": (0, 1), "b": (1, 2)}
