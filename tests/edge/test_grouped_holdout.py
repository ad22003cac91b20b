"""Grouped, time-ordered and random hold-outs of the edge dataset (edge/dataset.py)."""

from __future__ import annotations

import numpy as np
import pytest

from edge.dataset import Dataset, UnitTracker, group_in_holdout, group_key, holdout_mask
from firmware_adapters.rows import Feature, RowBuilder, RowMapping
from firmware_adapters.sample import Sample


def _rows(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.array([i, 0, 0], np.float32), np.array([i % 2], np.float32)) for i in range(n)]


def test_group_split_keeps_every_unit_on_one_side(tmp_path):
    ds = Dataset(tmp_path / "g.sqlite", (3,), 1, max_rows=10_000, holdout_fraction=0.25, split="group")
    units = [f"engine-{i // 20}" for i in range(2000)]  # 100 units of 20 rows
    ds.add_many(_rows(2000), groups=units)
    x_tr, _ = ds.arrays()
    x_ho, _ = ds.arrays(holdout=True)
    unit_of = {i: units[i] for i in range(2000)}
    train_units = {unit_of[int(v)] for v in x_tr[:, 0]}
    held_units = {unit_of[int(v)] for v in x_ho[:, 0]}
    assert not train_units & held_units  # no unit straddles the split
    assert len(train_units | held_units) == 100
    assert 10 <= len(held_units) <= 40  # about a quarter of the units (a hash, not a count)
    assert held_units == {u for u in set(units) if group_in_holdout(u, 0.25)}
    with pytest.raises(ValueError, match="group value"):
        ds.add_many(_rows(1))


def test_the_store_returns_each_rows_unit_for_the_served_model_pick(tmp_path):
    """The pick tests candidates over validation units (edge/personal.py): each row's unit comes back with it,
    as its group key, and a store made before the unit column gains it on open (old rows: no unit)."""
    import sqlite3

    path = tmp_path / "u.sqlite"
    old = sqlite3.connect(path)  # a store of the release before the unit column
    old.executescript(
        "CREATE TABLE examples (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, x BLOB NOT NULL, y BLOB, "
        "holdout INTEGER NOT NULL, historical INTEGER NOT NULL DEFAULT 0);"
        "INSERT INTO examples (ts, x, y, holdout) VALUES (0, x'000000000000000000000000', x'00000000', 0);"
    )
    old.close()
    ds = Dataset(path, (3,), 1, max_rows=10_000, holdout_fraction=0.25, split="group")
    units = [float(i // 20) for i in range(400)]  # engine numbers as a register delivers them
    ds.add_many(_rows(400), groups=units)
    x, _, train_units = ds.arrays_with_units()
    xv, _, val_units = ds.arrays_with_units(holdout=True)
    assert train_units[0] is None and len(train_units) == len(x) and len(val_units) == len(xv) > 0
    assert [str(int(v) // 20) for v in x[1:, 0]] == train_units[1:]  # "3", not "3.0": the group key
    assert [str(int(v) // 20) for v in xv[:, 0]] == val_units
    assert np.array_equal(ds.arrays(holdout=True)[0], xv)


def test_group_key_is_the_same_from_a_csv_and_from_a_register():
    assert group_key("7") == group_key(7) == group_key(7.0) == group_key(" 7.0 ") == "7"
    assert group_key(7.5) == "7.5" and group_key("press-3") == "press-3"


def test_time_split_holds_out_the_newest_rows(tmp_path):
    ds = Dataset(tmp_path / "t.sqlite", (3,), 1, max_rows=10_000, holdout_fraction=0.2, split="time")
    ds.add_many(_rows(50))
    assert ds.counts() == (40, 10)
    assert ds.arrays(holdout=True)[0][:, 0].tolist() == list(range(40, 50))
    assert ds.arrays()[0][:, 0].tolist() == list(range(40))
    ds.add_many(_rows(50))  # 100 rows: the newest 20 are held out now
    assert ds.arrays(holdout=True)[0][:, 0].tolist() == list(range(30, 50)) and ds.counts() == (80, 20)


@pytest.mark.parametrize("split", ["random", "group", "time"])
def test_holdout_mask_is_what_the_dataset_holds_out(tmp_path, split):
    """The demo's in-process comparison holds out rows by holdout_mask: it must match the store's choice."""
    n = 300
    units = [str(i // 7) for i in range(n)]
    ds = Dataset(tmp_path / f"{split}.sqlite", (3,), 1, max_rows=10_000, holdout_fraction=0.2, split=split)
    ds.add_many(_rows(n), groups=units if split == "group" else None)
    mask = holdout_mask(n, 0.2, split, units if split == "group" else None)
    assert ds.arrays(holdout=True)[0][:, 0].astype(int).tolist() == np.flatnonzero(mask).tolist()
    assert 0 < mask.sum() < n


def test_a_window_never_spans_two_units():
    """The agent restarts the row window when the unit changes (UnitTracker + RowBuilder.restart_window)."""
    builder = RowBuilder(RowMapping(features=[Feature("v", [0.0, 100.0])], label="y", window=3))
    units = UnitTracker("unit")
    made = []
    for t, (unit, v) in enumerate([(1, 1), (1, 2), (1, 3), (1, 4), (2, 50), (2, 51), (2, 52)]):
        sample = Sample(ts=float(t), source="csv", values={"unit": unit, "v": float(v), "y": 0.0})
        if units.observe(sample.values):
            builder.restart_window()
        row = builder.push(sample)
        if row is not None:
            made.append((units.current, (row.x[:, 0] * 100).round().tolist()))
    assert made == [("1", [1, 2, 3]), ("1", [2, 3, 4]), ("2", [50, 51, 52])]
