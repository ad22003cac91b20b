"""Folds of a site's training units (edge/unit_folds.py): whole units per fold, every row scored out of fold."""

from __future__ import annotations

import numpy as np
import pytest

from edge.unit_folds import fold_of_rows, out_of_fold


def test_a_group_split_keeps_each_unit_in_one_fold_and_deals_the_units_evenly():
    groups = [f"engine-{i // 7}" for i in range(7 * 13)]  # 13 engines of 7 rows
    folds = fold_of_rows(len(groups), 5, "group", groups)
    by_unit: dict[str, set[int]] = {}
    for g, f in zip(groups, folds):
        by_unit.setdefault(g, set()).add(int(f))
    assert all(len(v) == 1 for v in by_unit.values())  # an engine never straddles two folds
    units_per_fold = sorted(np.bincount([next(iter(v)) for v in by_unit.values()]).tolist())
    assert units_per_fold == [2, 2, 3, 3, 3]  # 13 engines dealt round-robin over 5 folds
    # the deal follows a hash of the unit, not the arrival order: the same units in another order, the same folds
    again = fold_of_rows(len(groups), 5, "group", groups[::-1])
    assert {g: int(f) for g, f in zip(groups[::-1], again)} == {g: next(iter(v)) for g, v in by_unit.items()}
    three = [str(i % 3) for i in range(30)]  # 3 engines: leave one engine out
    assert len(set(fold_of_rows(30, 5, "group", three).tolist())) == 3
    with pytest.raises(ValueError, match="one unit per training row"):
        fold_of_rows(30, 5, "group", three[:10])


def test_independent_rows_are_dealt_per_class_and_time_ordered_rows_in_blocks():
    y = np.array([1.0 if i % 10 == 0 else 0.0 for i in range(100)])  # 10 failures among 100 rows
    folds = fold_of_rows(100, 5, "random", y=y)
    assert np.bincount(folds[y == 1]).tolist() == [2, 2, 2, 2, 2]  # every fold gets two failures
    assert np.bincount(folds[y == 0]).tolist() == [18, 18, 18, 18, 18]
    time = fold_of_rows(10, 3, "time")
    assert time.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]  # consecutive stretches of the stream
    assert fold_of_rows(7, 5, "random", y=np.linspace(0, 1, 7)).tolist() == [0, 1, 2, 3, 4, 0, 1]  # regression


def test_out_of_fold_scores_every_row_by_models_that_never_trained_on_it():
    """Each 'model' is the set of rows it trained on; predicting a row says whether that model saw it."""
    folds = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    trained: list[tuple[str, frozenset[int]]] = []

    def train(rows: np.ndarray, kind: str) -> dict[str, np.ndarray]:
        trained.append((kind, frozenset(rows.tolist())))
        return {"seen": np.array(sorted(rows.tolist()))}

    def predict(params: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
        return np.array([float(r in set(params["seen"].tolist())) for r in rows])

    cache: dict[int, dict[str, np.ndarray]] = {}
    glob = {"seen": np.arange(8)}  # the global model saw every row (the site's DP rounds)
    oof = out_of_fold(folds, train, predict, glob, cache)
    assert oof["local"].tolist() == [0.0] * 8 and oof["fine_tuned"].tolist() == [0.0] * 8
    assert oof["global"].tolist() == [1.0] * 8
    assert sorted(k for k, _ in trained) == ["fine_tuned"] * 3 + ["local"] * 3
    assert {rows for k, rows in trained if k == "local"} == {
        frozenset({1, 2, 4, 5, 7}),
        frozenset({0, 2, 3, 5, 6}),
        frozenset({0, 1, 3, 4, 6, 7}),
    }
    trained.clear()
    out_of_fold(folds, train, predict, glob, cache)  # a new global version: only the fine-tunes are redone
    assert [k for k, _ in trained] == ["fine_tuned"] * 3
