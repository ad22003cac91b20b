"""``[strategy] input_column_veto`` (g = 1.2 by default since robust14g; RELIABILITY.md, robust14f/g): under MDA, a kept slot
is dropped from an input column of the first layer's weights whose own MDA subset leaves it out, where the kept
subset's diameter in that column exceeds ``g`` times the column subset's. Every number is worked by hand below.

The buffer (four slots, K = 3 kept, f = 1, every staleness 0, so each kept slot's coefficient is f(s)/K = 1/3),
a 1 × 2 weight ``w`` (columns 0 and 1: the weights that read inputs 0 and 1) and a bias ``b``:

    slot   w[:, 0]  w[:, 1]   b
    A      0        0         0
    B      2        0.2       0
    C      0.1      0         2.2
    D      0        1.5       0

Whole-vector distances: AB = √(4 + 0.04) = 2.010, AC = √(0.01 + 4.84) = 2.202, AD = 1.5, BC = √(3.61 + 0.04 + 4.84)
= 2.914, BD = √(4 + 1.69) = 2.385, CD = √(0.01 + 2.25 + 4.84) = 2.665. Diameters: ABC 2.914, ABD 2.385, ACD 2.665,
BCD 2.914, so MDA keeps S = {A, B, D} (C left out whole).

Column 0 (0, 2, 0.1, 0): ABC 2, ABD 2, ACD 0.1, BCD 2: S_0 = {A, C, D}, diameter 0.1; S's diameter there is 2 (AB),
ratio 20: B is dropped from column 0 for any g < 20.
Column 1 (0, 0.2, 0, 1.5): ABC 0.2, ABD 1.5, ACD 1.5, BCD 1.5: S_1 = {A, B, C}, diameter 0.2; S's there 1.5 (AD),
ratio 7.5: D is dropped from column 1 for any g < 7.5.

Steps (each remaining kept slot at 1/3, never rescaled up):
- off, or g = 25 (nothing dropped): w = ((0 + 2 + 0)/3, (0 + 0.2 + 1.5)/3) = (0.6666667, 0.5666667), b = 0;
- g = 10 (column 0 only): w = ((0 + 0)/3, 0.5666667) = (0, 0.5666667);
- g = 1 (both): w = (0, (0 + 0.2)/3) = (0, 0.0666667);
b = (0 + 0 + 0)/3 = 0 in every case, and the weights recorded A, B, D 1/3 and C 0 (no slot above 1/K anywhere).
"""

from __future__ import annotations

import numpy as np
import pytest

from aggregator import mda
from aggregator.config import StrategyConfig
from aggregator.strategies import aggregate
from aggregator.strategies.base import Accepted
from aggregator.strategies.fedbuff import FedBuff
from fedline.config import ConfigError, parse

ROWS = {"A": (0.0, 0.0, 0.0), "B": (2.0, 0.2, 0.0), "C": (0.1, 0.0, 2.2), "D": (0.0, 1.5, 0.0)}


def deltas() -> list[dict[str, np.ndarray]]:
    return [{"w": np.array([[a, b]], np.float32), "b": np.array([c], np.float32)} for a, b, c in ROWS.values()]


def ups() -> list[Accepted]:
    return [Accepted(s, 1, s, 0, 10, 0, 1.0, 0.0, d) for s, d in zip(ROWS, deltas())]


def strategy(gate: float) -> FedBuff:
    return FedBuff(StrategyConfig(norm_bound=0, clip_to_median=False, input_column_veto=gate), 4)


def test_the_subsets_and_the_vetoes_worked_by_hand():
    d = deltas()
    keep = aggregate.mda_keep(d, 1)
    assert keep == (0, 1, 3)  # {A, B, D}
    assert aggregate.input_tensor(d[0]) == "w"
    col1 = np.array([[0.0], [0.2], [0.0], [1.5]], np.float32)
    assert mda.diameter(mda.distances(col1), keep) == pytest.approx(1.5, rel=1e-5)
    assert mda.diameter(mda.distances(col1), (0, 1, 2)) == pytest.approx(0.2, rel=1e-5)
    assert aggregate.column_vetoes(d, keep, "w", 1, 1.0) == {0: [1], 1: [3]}
    assert aggregate.column_vetoes(d, keep, "w", 1, 10.0) == {0: [1]}
    assert aggregate.column_vetoes(d, keep, "w", 1, 25.0) == {}


@pytest.mark.parametrize(
    "gate, expected",
    [(0.0, [2 / 3, 1.7 / 3]), (25.0, [2 / 3, 1.7 / 3]), (10.0, [0.0, 1.7 / 3]), (1.0, [0.0, 0.2 / 3])],
)
def test_the_step_drops_the_vetoed_slot_from_its_column_only(gate: float, expected: list[float]) -> None:
    fb = strategy(gate)
    assert (fb.reduce_stat, fb.buffer_size, fb.arrivals) == ("mda", 3, 4)
    u = ups()
    zero = {"w": np.zeros((1, 2), np.float32), "b": np.zeros(1, np.float32)}
    r = fb.reduce(zero, u, None)
    np.testing.assert_allclose(r.model["w"][0], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(r.model["b"], [0.0], atol=1e-7)
    assert [x.weight for x in u] == [pytest.approx(1 / 3), pytest.approx(1 / 3), 0.0, pytest.approx(1 / 3)]


def test_a_model_without_a_two_d_tensor_is_plain_mda():
    """1-D rows 0, 1, 2, 10 (test_mda's): nothing to veto, the step (0 + 1 + 2)/3 = 1.0 as MDA's."""
    fb = strategy(1.0)
    u = [Accepted(s, 1, s, 0, 10, 0, 1.0, 0.0, {"w": np.array([v], np.float32)}) for s, v in zip("abcm", (0, 1, 2, 10))]
    np.testing.assert_allclose(fb.reduce({"w": np.zeros(1, np.float32)}, u, None).model["w"], [1.0], rtol=1e-6)


def test_a_model_whose_first_weights_are_conv_kernels_is_plain_mda():
    """cnn1d: the first tensor of two or more dimensions is a 3-D kernel (out x in x k); the later 2-D one reads
    channels, not inputs, so nothing is vetoed. The kernel is 0 in every slot, so the distances and S = {A, B, D} are
    those above, and the step is MDA's, w = (0.6666667, 0.5666667), where g = 1 on ``w`` alone gives (0, 0.0666667)."""
    fb = strategy(1.0)
    d = [
        {"k": np.zeros((1, 1, 1), np.float32), "w": np.array([[a, b]], np.float32), "b": np.array([c], np.float32)}
        for a, b, c in ROWS.values()
    ]
    assert aggregate.input_tensor(d[0]) is None and aggregate.input_tensor({"w": d[0]["w"]}) == "w"
    u = [Accepted(s, 1, s, 0, 10, 0, 1.0, 0.0, x) for s, x in zip(ROWS, d)]
    zero = {"k": np.zeros((1, 1, 1), np.float32), "w": np.zeros((1, 2), np.float32), "b": np.zeros(1, np.float32)}
    r = fb.reduce(zero, u, None)
    np.testing.assert_allclose(r.model["w"][0], [2 / 3, 1.7 / 3], rtol=1e-6)
    np.testing.assert_allclose(r.model["k"].reshape(-1), [0.0], atol=1e-7)
    assert [x.weight for x in u] == [pytest.approx(1 / 3), pytest.approx(1 / 3), 0.0, pytest.approx(1 / 3)]


def test_the_gate_is_zero_or_at_least_one_and_1_2_by_default():
    assert StrategyConfig().input_column_veto == 1.2
    assert StrategyConfig(input_column_veto=0).input_column_veto == 0.0  # off: plain MDA
    with pytest.raises(ConfigError, match="input_column_veto must be 0"):
        parse(StrategyConfig, {"input_column_veto": 0.5}, where="strategy")
