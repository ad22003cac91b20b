"""Samples to rows: engineering-range normalisation, windows, labels, any tag names."""

from __future__ import annotations

import numpy as np
import pytest

from fedline.config import ConfigError
from firmware_adapters.rows import RowBuilder, parse_row_mapping
from firmware_adapters.sample import Sample

TAGS = ["Motor 7 / Strom [A]", "Druck (bar)"]


def s(ts: float, **values) -> Sample:
    return Sample(
        ts=ts, source="t", values={TAGS[0] if k == "a" else TAGS[1] if k == "b" else k: v for k, v in values.items()}
    )


def mapping(**kw):
    table = {
        "features": [{"tag": TAGS[0], "range": [0.0, 10.0]}, {"tag": TAGS[1], "range": [-1.0, 1.0]}],
        "label": "fail",
        **kw,
    }
    return parse_row_mapping(table, file="site.toml")


def test_normalises_with_configured_ranges_not_the_data() -> None:
    b = RowBuilder(mapping())
    r1 = b.push(s(1, a=5.0, b=0.0, fail=False))
    assert r1 is not None and r1.x.dtype == np.float32
    np.testing.assert_allclose(r1.x, [0.5, 0.5])
    assert r1.y == 0.0 and r1.ts == 1
    # the same raw value maps to the same feature whatever else the site has seen
    b.push(s(2, a=9.0, b=0.9, fail=True))
    r3 = b.push(s(3, a=5.0, b=0.0, fail=True))
    np.testing.assert_allclose(r3.x, r1.x)
    assert r3.y == 1.0
    # outside the range: clipped to [0, 1] and counted
    r4 = b.push(s(4, a=20.0, b=-3.0, fail=0))
    np.testing.assert_allclose(r4.x, [1.0, 0.0])
    assert b.stats.out_of_range == 2
    assert b.shape == (2,) and b.n_features == 2


def test_ranges_from_the_source_and_missing_range_error() -> None:
    table = {"features": [{"tag": TAGS[0]}, {"tag": "x", "range": [0, 2]}]}
    b = RowBuilder(parse_row_mapping(table), ranges={TAGS[0]: (10.0, 20.0)})
    np.testing.assert_allclose(b.push(s(0, a=15.0, x=1)).x, [0.5, 0.5])
    with pytest.raises(ConfigError) as info:
        RowBuilder(parse_row_mapping(table), ranges={}, file="site.toml")
    assert info.value.key == "rows.features[0].range" and TAGS[0] in info.value.message


def test_mapping_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_row_mapping({"features": [{"tag": "a", "range": [5, 1]}]}, file="site.toml")
    assert info.value.key == "rows.features[0]"
    with pytest.raises(ConfigError) as info:
        parse_row_mapping({"features": [{"tag": "a"}], "task": "clustering"}, file="site.toml")
    assert info.value.key == "rows.task"
    with pytest.raises(ConfigError):
        parse_row_mapping({"features": [{"tag": "a"}], "window": 4, "aggregate_s": 1.0})


def test_window_of_last_n_samples_with_stride() -> None:
    b = RowBuilder(mapping(window=3, stride=2))
    rows = [b.push(s(t, a=float(t), b=0.0, fail=t == 4)) for t in range(7)]
    emitted = [r for r in rows if r is not None]
    assert [r.ts for r in emitted] == [2, 4, 6]
    assert emitted[0].x.shape == (3, 2) == b.shape
    np.testing.assert_allclose(emitted[1].x[:, 0], [0.2, 0.3, 0.4])
    assert emitted[1].y == 1.0 and emitted[2].y == 0.0
    # a failed read restarts the window: no row until three new samples
    assert b.push(Sample.bad("t", "timeout")) is None
    assert [b.push(s(t, a=1.0, b=0.0, fail=0)) is None for t in (7, 8)] == [True, True]
    assert b.push(s(9, a=1.0, b=0.0, fail=0)) is not None


def test_time_window_aggregates_and_label_max() -> None:
    b = RowBuilder(mapping(aggregate_s=10.0, aggregates=["mean", "min", "max", "std", "last"]))
    out = [b.push(s(t, a=float(v), b=0.0, fail=f)) for t, v, f in [(0, 2, 0), (4, 4, 1), (9, 6, 0), (10, 8, 0)]]
    assert out[:3] == [None, None, None]
    row = out[3]
    assert row is not None and row.x.shape == (10,) == b.shape and row.ts == 9
    a = np.array([0.2, 0.4, 0.6])
    np.testing.assert_allclose(row.x[[0, 2, 4, 6, 8]], [a.mean(), a.min(), a.max(), a.std(), a[-1]], rtol=1e-6)
    assert row.y == 1.0  # a failure anywhere in the window labels the window
    last = b.flush()
    assert last is not None and last.ts == 10 and last.y == 0.0 and b.flush() is None


def test_regression_label_range_and_text_classes() -> None:
    b = RowBuilder(mapping(task="regression", label="wear", label_range=[0.0, 200.0]))
    assert b.push(s(0, a=1.0, b=0.0, wear=50)).y == 0.25
    c = RowBuilder(mapping(label="grade", classes=["L", "M", "H"]))
    assert c.push(s(0, a=1.0, b=0.0, grade="H")).y == 2.0
    assert c.push(s(1, a=1.0, b=0.0, grade="X")).y is None and c.stats.bad_labels == 1


def test_bad_incomplete_and_unlabelled_samples() -> None:
    b = RowBuilder(mapping(trigger="row"))
    assert b.push(Sample.bad("t", "timeout")) is None
    assert b.push(s(0, a=1.0, row=1)) is None  # no value yet for the second feature
    assert b.push(s(1, b=0.5)) is None  # not a trigger sample
    row = b.push(s(2, row=2))  # the latest values of every tag combine into one row
    assert row is not None and row.y is None  # inference rows need no label
    np.testing.assert_allclose(row.x, [0.1, 0.75])
    assert b.push(s(3, a=None, row=3)) is None
    assert (b.stats.bad_samples, b.stats.incomplete, b.stats.rows) == (1, 2, 1)


def hist(ts: float, **values) -> Sample:
    return Sample(
        ts=ts,
        source="t",
        values={TAGS[0] if k == "a" else TAGS[1] if k == "b" else k: v for k, v in values.items()},
        historical=True,
    )


def test_historical_samples_make_marked_rows_and_never_touch_the_live_state() -> None:
    b = RowBuilder(mapping())
    live = b.push(s(100, a=5.0, b=0.0, fail=0))
    assert live is not None and live.historical is False
    # a store-and-forward backfill from before: its rows are marked, from its own values only
    assert b.push(hist(10, a=1.0, fail=0)) is None  # b unknown in the historical lane: incomplete, not live's 0.0
    old = b.push(hist(11, b=1.0, fail=1))
    assert old is not None and old.historical is True and old.ts == 11 and old.y == 1.0
    np.testing.assert_allclose(old.x, [0.1, 1.0])
    # the live state is what it was: a has not become 1.0
    now = b.push(s(101, b=-1.0, fail=0))
    assert now is not None and not now.historical
    np.testing.assert_allclose(now.x, [0.5, 0.0])
    assert (b.stats.rows, b.stats.historical_rows, b.stats.samples) == (3, 1, 4)


def test_historical_lane_has_its_own_window_and_a_bad_live_sample_does_not_break_it() -> None:
    b = RowBuilder(mapping(window=2))
    assert b.push(hist(1, a=1.0, b=0.0, fail=0)) is None
    b.push(Sample.bad("t", "read failed"))  # restarts the live window only
    w = b.push(hist(2, a=2.0, b=0.0, fail=0))
    assert w is not None and w.historical and w.x.shape == (2, 2)
    np.testing.assert_allclose(w.x[:, 0], [0.1, 0.2])
