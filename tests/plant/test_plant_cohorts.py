"""How a plant's waiting reduces become one masked update of a central cohort (``plant.cohorts.combine``)."""

from __future__ import annotations

import numpy as np
import pytest

from plant.cohorts import combine


def _reduce(v: int, base: int, values: list[float], samples: int, lines: int, eps: float | None):
    privacy = {"mode": "plant", "accounting": "per_line", "lines": lines, "epsilon": eps}
    return v, base, {"w": np.array(values, np.float32)}, samples, privacy


def test_waiting_reduces_go_in_as_their_mean_with_their_samples_and_the_largest_epsilon():
    """Each reduce is already a mean of line updates computed from a central model: the mean of two such
    reduces is (1, 2) and (3, -2) -> (2, 0), not their sum (4, 0), which would count the lines twice."""
    last, delta, samples, privacy = combine(
        [_reduce(3, 0, [1.0, 2.0], 100, 2, 0.5), _reduce(5, 1, [3.0, -2.0], 60, 3, 0.75)]
    )
    assert last == 5 and samples == 160
    np.testing.assert_array_equal(delta["w"], np.array([2.0, 0.0], np.float32))
    assert delta["w"].dtype == np.float32
    assert privacy == {"mode": "plant", "accounting": "per_line", "lines": 3, "epsilon": 0.75}


def test_an_unknown_line_epsilon_is_reported_unknown_and_nothing_to_combine_is_an_error():
    _, _, _, privacy = combine([_reduce(1, 0, [1.0], 10, 1, None), _reduce(2, 0, [1.0], 10, 1, 0.3)])
    assert privacy["epsilon"] is None
    with pytest.raises(ValueError, match="no reduce"):
        combine([])
