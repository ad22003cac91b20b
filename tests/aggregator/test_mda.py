"""Minimum-diameter averaging (aggregator/mda.py; El-Mhamdi, Guerraoui and Rouault, ICLR 2021) as ``robust = "mda"``,
the default reduce wherever a buffer has three slots or more (issue 14).

Of the subsets of ``n − f`` slots, the one whose largest pairwise L2 distance (measured between the deltas) is
smallest is kept, and the step is ``n · mean_{i ∈ S}(c_i Δ_i)`` with FedBuff's ``c_i = f(s_i)/K`` (the median's
scaling: the plain mean's step when every slot agrees); a left-out slot gets no part of it. Every expected
number is worked by hand in the docstrings.
"""

from __future__ import annotations

import numpy as np
import pytest

from aggregator import mda
from aggregator.config import StrategyConfig
from aggregator.strategies import Accepted, FedBuff, aggregate, reduce_choice
from fedline.config import ConfigError, parse

ROWS = ([1.0, 0.0], [1.2, 0.1], [-3.0, 5.0])


def test_distances_worked_by_hand():
    """(1, 0), (1.2, 0.1), (−3, 5): √(0.04 + 0.01) = 0.2236068, √(16 + 25) = 6.4031242,
    √(4.2² + 4.9²) = √(17.64 + 24.01) = 6.4536811."""
    d = mda.distances(np.array(ROWS))  # a float32 Gram matrix: six digits
    np.testing.assert_allclose(d[0, 1], 0.2236068, rtol=1e-5)
    np.testing.assert_allclose(d[0, 2], 6.4031242, rtol=1e-6)
    np.testing.assert_allclose(d[1, 2], 6.4536811, rtol=1e-6)
    np.testing.assert_allclose(d, d.T)
    assert (np.diag(d) == 0).all()


def test_the_far_slot_is_left_out_whole():
    """The three rows above, c = 1/3 each, f = 1: pairs' diameters 0.224, 6.40, 6.45: S = {0, 1};
    step = 3 · ((1/3)(1, 0) + (1/3)(1.2, 0.1))/2 = (1.1, 0.05)."""
    deltas = [{"w": np.array(r, np.float32)} for r in ROWS]
    step, keep = aggregate.mda_combination(deltas, [1 / 3] * 3)
    assert keep == (0, 1)
    np.testing.assert_allclose(step["w"], [1.1, 0.05], rtol=1e-6)


def test_staleness_scales_the_step_not_the_diameter():
    """Same rows, the second stale (c = f(s)/K = 0.2, as f(3) = 0.6 at K = 3): S is still {0, 1} (the diameter is
    taken between the deltas); step = 3 · ((1/3)(1, 0) + 0.2 (1.2, 0.1))/2 = 1.5 · (0.5733333, 0.02)
    = (0.86, 0.03)."""
    deltas = [{"w": np.array(r, np.float32)} for r in ROWS]
    step, keep = aggregate.mda_combination(deltas, [1 / 3, 0.2, 1 / 3])
    assert keep == (0, 1)
    np.testing.assert_allclose(step["w"], [0.86, 0.03], rtol=1e-6)


def test_five_slots_one_left_out():
    """1-D rows 0, 1, 2, 10, 3, f = 1: leaving out 10 gives values {0, 1, 2, 3} of diameter 3; every subset with
    10 has a diameter of at least 8. c = 1/5 each: step = 5 · (1/5) · mean(0, 1, 2, 3) = 1.5."""
    deltas = [{"w": np.array([x], np.float32)} for x in (0.0, 1.0, 2.0, 10.0, 3.0)]
    step, keep = aggregate.mda_combination(deltas, [0.2] * 5)
    assert keep == (0, 1, 2, 4)
    np.testing.assert_allclose(step["w"], [1.5], rtol=1e-6)


def test_two_left_out_and_a_tie_keeps_the_first_in_index_order():
    """The same five rows, f = 2: subsets of three; indices {0, 1, 2} (values 0, 1, 2) and {1, 2, 4} (values
    1, 2, 3) both have diameter 2, every other at least 3: the first in index order, {0, 1, 2};
    step = 5 · (1/5) · mean(0, 1, 2) = 1."""
    deltas = [{"w": np.array([x], np.float32)} for x in (0.0, 1.0, 2.0, 10.0, 3.0)]
    step, keep = aggregate.mda_combination(deltas, [0.2] * 5, f=2)
    assert keep == (0, 1, 2)
    np.testing.assert_allclose(step["w"], [1.0], rtol=1e-6)


def test_equal_diameters_within_float32_rounding_are_a_tie():
    """Three equal rows: every pair's diameter is 0 up to rounding; the first pair, (0, 1), is kept."""
    rows = np.tile(np.linspace(-1.0, 1.0, 1000, dtype=np.float32), (3, 1))
    assert mda.subset(mda.distances(rows), 1) == (0, 1)


def test_f_is_lowered_so_that_a_majority_is_kept():
    """n = 3, f = 2 would keep one slot: f becomes (3 − 1) // 2 = 1. Rows 0, 1, 5: pair {0, 1}. Two slots: f = 0,
    both kept (neither is the outlier of two)."""
    assert mda.subset(mda.distances(np.array([[0.0], [1.0], [5.0]])), 2) == (0, 1)
    assert mda.subset(mda.distances(np.array([[0.0], [9.0]])), 1) == (0, 1)


@pytest.mark.parametrize(
    "table,k,expected",
    [
        ({}, 4, "mda"),  # K = min(10, 4)
        ({"buffer_size": 3}, 3, "mda"),
        ({"kind": "fedavg"}, 3, "mda"),
        ({"buffer_size": 2, "min_sites": 2}, 2, "mean"),  # two slots: neither is the outlier
        ({"secure_aggregation": True}, 4, "mean"),  # only masked sums: nothing to measure
        ({"robust": "median"}, 4, "median"),  # the median stays an option
    ],
)
def test_mda_is_the_default_wherever_it_can_run(table, k, expected):
    assert reduce_choice.resolve(parse(StrategyConfig, table, where="strategy"), k) == expected


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="mda_f must be at least 1"):
        parse(StrategyConfig, {"mda_f": 0}, where="strategy")
    with pytest.raises(ConfigError, match=r"C\(40, 5\) = 658008 subsets"):
        parse(StrategyConfig, {"robust": "mda", "mda_f": 5, "buffer_size": 40}, where="strategy")


def test_fedbuff_records_who_was_left_out():
    """K = 3, no norm bound, fresh slots: the lineage's weight is the coefficient each got in the step,
    (3/2)(1/3) = 1/2 for the two kept, 0 for the far one; the model moves by (1.1, 0.05) from 0."""
    cfg = StrategyConfig(buffer_size=3, norm_bound=0, clip_to_median=False)
    fb = FedBuff(cfg)
    assert fb.reduce_stat == "mda"
    ups = [
        Accepted(s, 1, s, 0, 10, 0, 1.0, 1 / 3, {"w": np.array(r, np.float32)}) for s, r in zip(("a", "b", "m"), ROWS)
    ]
    r = fb.reduce({"w": np.zeros(2, np.float32)}, ups, None)
    np.testing.assert_allclose(r.model["w"], [1.1, 0.05], rtol=1e-6)
    assert [u.lineage()["weight"] for u in ups] == [pytest.approx(0.5), pytest.approx(0.5), 0.0]


def test_scale_k_keeps_each_kept_slot_at_its_fedbuff_coefficient():
    """``mda_scale = "k"``: 1-D rows 0, 1, 2, 10 at K = 4, f = 1: S = {0, 1, 2} (diameter 2; any subset with 10
    at least 8). Fresh, c = 1/4 each: step = (1/4)(0 + 1 + 2) = 0.75 (``"kept"``: 4 · (1/4) · mean = 1.0).
    The second stale, c = f(3)/K = 0.6/4 = 0.15: step = 0.25 · 0 + 0.15 · 1 + 0.25 · 2 = 0.65 (``"kept"``:
    (4/3) · 0.65 = 0.8666667). Weights: 0.25, 0.15, 0.25, 0 (never above 1/K)."""
    deltas = [{"w": np.array([x], np.float32)} for x in (0.0, 1.0, 2.0, 10.0)]
    step, keep = aggregate.mda_combination(deltas, [0.25] * 4, scale="k")
    assert keep == (0, 1, 2)
    np.testing.assert_allclose(step["w"], [0.75], rtol=1e-6)
    np.testing.assert_allclose(aggregate.mda_combination(deltas, [0.25] * 4)[0]["w"], [1.0], rtol=1e-6)
    stale = [0.25, 0.15, 0.25, 0.25]
    np.testing.assert_allclose(aggregate.mda_combination(deltas, stale, scale="k")[0]["w"], [0.65], rtol=1e-6)
    np.testing.assert_allclose(aggregate.mda_combination(deltas, stale)[0]["w"], [0.8666667], rtol=1e-6)
    assert aggregate.mda_weights(stale, keep, "k") == pytest.approx([0.25, 0.15, 0.25, 0.0])
    with pytest.raises(ValueError, match="mda scale"):
        aggregate.mda_weights(stale, keep, "half")


def test_fedbuff_with_scale_k_records_f_over_k():
    """K = 3, ``mda_scale = "k"``, fresh slots (1, 0), (1.2, 0.1), (−3, 5): the two kept at 1/3 each, the far one
    0; the model moves by (1/3)((1, 0) + (1.2, 0.1)) = (0.7333333, 0.0333333) from 0."""
    cfg = StrategyConfig(buffer_size=3, norm_bound=0, clip_to_median=False, mda_scale="k")
    fb = FedBuff(cfg)
    ups = [
        Accepted(s, 1, s, 0, 10, 0, 1.0, 1 / 3, {"w": np.array(r, np.float32)}) for s, r in zip(("a", "b", "m"), ROWS)
    ]
    r = fb.reduce({"w": np.zeros(2, np.float32)}, ups, None)
    np.testing.assert_allclose(r.model["w"], [0.7333333, 0.0333333], rtol=1e-5)
    assert [u.lineage()["weight"] for u in ups] == [pytest.approx(1 / 3), pytest.approx(1 / 3), 0.0]
