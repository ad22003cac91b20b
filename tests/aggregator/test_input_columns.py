"""The per-input-column experiments against the late MDA keeps (RELIABILITY.md, robust14e): the column clip, MDA
per input column, and MDA's distance plus the largest column's, each against numbers worked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator import robust
from aggregator.config import StrategyConfig
from aggregator.strategies import Accepted, FedBuff, aggregate


def test_clip_columns_worked_by_hand():
    """Three slots, a 2 × 2 first layer (column j: the weights reading input j). Column 0's norms: (3, 4) → 5,
    (0, 1) → 1, (6, 8) → 10; median 5, so the third slot's column is scaled by 5/10 = 0.5 to (3, 4). Column 1's:
    (1, 0) → 1, (0, 2) → 2, (0, 0) → 0; median 1, so the second slot's is scaled by 1/2 to (0, 1). With four slots
    the median is the mean of the two middle norms: column norms 1, 2, 4, 8 give 3, so 4 → 3 (0.75), 8 → 3 (0.375)."""
    x = np.array(
        [
            [[3, 1], [4, 0]],
            [[0, 0], [1, 2]],
            [[6, 0], [8, 0]],
        ],
        np.float32,
    )
    clipped, scales = robust.clip_columns(x)
    np.testing.assert_allclose(scales, [[1, 1], [1, 0.5], [0.5, 1]])
    np.testing.assert_allclose(clipped[2, :, 0], [3, 4], rtol=1e-6)
    np.testing.assert_allclose(clipped[1, :, 1], [0, 1], rtol=1e-6)
    np.testing.assert_allclose(clipped[0], x[0])  # at or below the median: untouched
    four = np.array([[[1.0]], [[2.0]], [[4.0]], [[-8.0]]], np.float32)
    clipped, scales = robust.clip_columns(four)
    np.testing.assert_allclose(scales[:, 0], [1, 1, 0.75, 0.375])
    np.testing.assert_allclose(clipped[:, 0, 0], [1, 2, 3, -3], rtol=1e-6)


def test_mda_columns_worked_by_hand():
    """Four slots, a 1 × 2 tensor, f = 1. Column 0 holds 0, 1, 2, 10: the three closest are {0, 1, 2} (diameter 2;
    any subset with 10 at least 8), summed at 1/3 each: 1.0. Column 1 holds 10, 0, 1, 2: {1, 2, 3}, (0 + 1 + 2)/3 =
    1.0. With coefficients that depend on the subset (here 0.5 for its first index, 0.25 for the others) column 0
    is 0.5·0 + 0.25·1 + 0.25·2 = 0.75 and column 1 is 0.5·0 + 0.25·1 + 0.25·2 = 0.75."""
    deltas = [{"w": np.array([[a, b]], np.float32)} for a, b in ((0, 10), (1, 0), (2, 1), (10, 2))]
    step, keeps = aggregate.mda_columns(deltas, lambda s: [1 / 3] * len(s), "w", 1)
    assert keeps == [(0, 1, 2), (1, 2, 3)]
    np.testing.assert_allclose(step, [[1.0, 1.0]], rtol=1e-6)
    step, _ = aggregate.mda_columns(deltas, lambda s: [0.5] + [0.25] * (len(s) - 1), "w", 1)
    np.testing.assert_allclose(step, [[0.75, 0.75]], rtol=1e-6)


def four_slots() -> list[dict[str, np.ndarray]]:
    """First layer ``w`` (1 × 2), bias ``b`` (1): slot 3 differs from slot 0 only in input column 0 (by 3), slot 2
    only in the bias (by 3.2), slot 1 in the bias by 1."""
    rows = (((0, 0), 0), ((0, 0), 1), ((0, 0), 3.2), ((3, 0), 0))
    return [{"w": np.array([w], np.float32), "b": np.array([b], np.float32)} for w, b in rows]


def test_mda_keep_with_the_largest_column_distance_worked_by_hand():
    """Whole-vector distances: d01 = 1, d02 = 3.2, d03 = 3, d12 = 2.2, d13 = √10 = 3.162, d23 = √(9 + 10.24) =
    4.386. Diameters: {0,1,2} 3.2, {0,1,3} 3.162, {0,2,3} and {1,2,3} 4.386: MDA keeps {0, 1, 3}, the slot that
    differs in one input's weights. Adding the largest column distance (column 0: 3 between slot 3 and each other,
    column 1: 0): d03 = 6, d13 = 6.162, d23 = 7.386, the rest as before; {0,1,2} 3.2 against {0,1,3} 6.162: {0, 1, 2}."""
    assert aggregate.mda_keep(four_slots(), 1) == (0, 1, 3)
    assert aggregate.mda_keep(four_slots(), 1, column_distance=True) == (0, 1, 2)
    assert aggregate.input_tensor(four_slots()[0]) == "w"
    assert aggregate.input_tensor({"b": np.zeros(3, np.float32)}) is None
    assert aggregate.mda_keep([{"b": np.array([v], np.float32)} for v in (0, 1, 2, 9)], 1, True) == (0, 1, 2)


def ups() -> list[Accepted]:
    return [Accepted(s, 1, s, 0, 10, 0, 1.0, 0.0, d) for s, d in zip("abcm", four_slots())]


def test_the_strategy_takes_the_first_layer_column_by_column():
    """FedBuff, four enrolled (K = 3 of 4, 1/3 each), no norm bound. Whole-vector MDA keeps {0, 1, 3} (above):
    w = (0 + 0 + 3)/3 = 1.0, 0; b = (0 + 1 + 0)/3 = 0.3333333. With ``input_column_mda`` the bias stays the whole
    vector's, and w's column 0 (0, 0, 0, 3) keeps {0, 1, 2}: 0; column 1 (all 0): 0. Slot 3 is kept on the bias
    (1/3) and left out of column 0: its weight is its largest coefficient, 1/3; slot 2, left out of the bias and
    kept in both columns, also 1/3. With ``mda_column_distance`` instead {0, 1, 2} is kept whole: w 0, b 4.2/3 =
    1.4, slot 3's weight 0."""
    zero = {"w": np.zeros((1, 2), np.float32), "b": np.zeros(1, np.float32)}
    plain = FedBuff(StrategyConfig(norm_bound=0, clip_to_median=False), 4)
    r = plain.reduce(zero, ups(), None)
    np.testing.assert_allclose(r.model["w"], [[1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(r.model["b"], [1 / 3], rtol=1e-6)
    cols = FedBuff(StrategyConfig(norm_bound=0, clip_to_median=False, input_column_mda=True), 4)
    u = ups()
    r = cols.reduce(zero, u, None)
    np.testing.assert_allclose(r.model["w"], [[0.0, 0.0]], atol=1e-7)
    np.testing.assert_allclose(r.model["b"], [1 / 3], rtol=1e-6)
    assert [x.weight for x in u] == [pytest.approx(1 / 3)] * 4
    dist = FedBuff(StrategyConfig(norm_bound=0, clip_to_median=False, mda_column_distance=True), 4)
    u = ups()
    r = dist.reduce(zero, u, None)
    np.testing.assert_allclose(r.model["w"], [[0.0, 0.0]], atol=1e-7)
    np.testing.assert_allclose(r.model["b"], [1.4], rtol=1e-6)
    assert [x.weight for x in u] == [pytest.approx(1 / 3)] * 3 + [0.0]


def test_the_strategy_clips_each_input_column_to_the_buffers_median():
    """``input_column_clip``, no norm bound: column 0's norms are 0, 0, 0, 3 (median 0), so slot 3's column 0 is
    clipped to 0 and w's step is 0 whatever MDA keeps; its bias is untouched (b: (0 + 1 + 0)/3 as whole-vector MDA
    then keeps {0, 1, 3}: with column 0 at 0, slot 3 equals slot 0, diameter 1 for {0, 1, 3}). Only under MDA: under
    the mean (``robust = "none"``) slot 3's column stays (3, 0)."""
    zero = {"w": np.zeros((1, 2), np.float32), "b": np.zeros(1, np.float32)}
    fb = FedBuff(StrategyConfig(norm_bound=0, clip_to_median=False, input_column_clip=True), 4)
    r = fb.reduce(zero, ups(), None)
    np.testing.assert_allclose(r.model["w"], [[0.0, 0.0]], atol=1e-7)
    np.testing.assert_allclose(r.model["b"], [1 / 3], rtol=1e-6)
    mean = FedBuff(StrategyConfig(norm_bound=0, clip_to_median=False, input_column_clip=True, robust="none"), 4)
    deltas, _ = mean.clipped(ups())
    np.testing.assert_allclose(deltas[3]["w"], [[3.0, 0.0]])
