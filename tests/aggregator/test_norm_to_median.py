"""``norm_to_median``: every delta of a buffer rescaled to the buffer's median norm, up as well as down.

Why it matters (RELIABILITY.md, issue 14's "samples" attack): under the coordinate-wise median a short
backdoored delta sits between the honest values in many coordinates and is picked there; rescaled to the
median norm it has no freedom of scale left. Every expected number is worked by hand in the docstrings.
"""

from __future__ import annotations

import numpy as np
import pytest

from aggregator import robust
from aggregator.config import StrategyConfig
from aggregator.strategies import Accepted, FedBuff
from fedline.config import parse


def up(delta: list[float], site: str) -> Accepted:
    return Accepted(site, 1, "m", 0, 10, 0, 1.0, 0.0, {"w": np.array(delta, np.float32)})


def test_rescale_scales_down_and_up_and_leaves_zero_alone():
    """(3, 4) has norm 5: to 10 it is (6, 8) (scale 2), to 2.5 it is (1.5, 2) (scale 0.5); (0, 0) stays."""
    d, s = robust.rescale({"w": np.array([3.0, 4.0], np.float32)}, 10.0)
    np.testing.assert_allclose(d["w"], [6.0, 8.0], rtol=1e-6)
    assert s == pytest.approx(2.0)
    d, s = robust.rescale({"w": np.array([3.0, 4.0], np.float32)}, 2.5)
    np.testing.assert_allclose(d["w"], [1.5, 2.0], rtol=1e-6)
    assert s == pytest.approx(0.5)
    d, s = robust.rescale({"w": np.zeros(2, np.float32)}, 5.0)
    np.testing.assert_array_equal(d["w"], [0.0, 0.0])
    assert s == 1.0


def test_median_of_rescaled_slots_worked_by_hand():
    """K = 3, fresh updates, η_g = 1, x = (0, 0); deltas a = (4, 3) (norm 5), b = (0, 1) (norm 1),
    c = (0, 20) (norm 20); median norm 5, no [dp] bound (norm_bound = 0).
    - clipping only (the old default): a = (4, 3), b = (0, 1), c → (0, 5); median (0, 3); x = (0, 3).
    - rescaled: a = (4, 3), b → (0, 5) (scale 5), c → (0, 5) (scale 1/4); median (0, 5); x = (0, 5)."""
    ups = [up([4.0, 3.0], "a"), up([0.0, 1.0], "b"), up([0.0, 20.0], "c")]
    x0 = {"w": np.zeros(2, np.float32)}
    clip_only = FedBuff(StrategyConfig(robust="median", buffer_size=3, norm_bound=0.0, norm_to_median=False), 3)
    np.testing.assert_allclose(clip_only.reduce(x0, ups, None).model["w"], [0.0, 3.0], atol=1e-6)
    rescaled = FedBuff(StrategyConfig(robust="median", buffer_size=3, norm_bound=0.0, norm_to_median=True), 3)
    result = rescaled.reduce(x0, ups, None)
    np.testing.assert_allclose(result.model["w"], [0.0, 5.0], atol=1e-6)
    np.testing.assert_allclose(result.clip_scales, [1.0, 5.0, 0.25], rtol=1e-6)


def test_the_dp_bound_caps_the_target():
    """norm_bound = 2 below the median norm 5: every delta goes to norm 2, b = (0, 1) up to (0, 2), a = (4, 3)
    down to (1.6, 1.2), c down to (0, 2); median (0, 2)."""
    ups = [up([4.0, 3.0], "a"), up([0.0, 1.0], "b"), up([0.0, 20.0], "c")]
    strat = FedBuff(StrategyConfig(robust="median", buffer_size=3, norm_bound=2.0, norm_to_median=True), 3)
    np.testing.assert_allclose(
        strat.reduce({"w": np.zeros(2, np.float32)}, ups, None).model["w"], [0.0, 2.0], rtol=1e-6
    )


def test_norm_to_median_is_the_default_and_needs_the_median_norm():
    """On by default; without clip_to_median there is no median norm to rescale to: b = (0, 1) is not scaled up
    to norm_bound = 2 (the [dp] bound is a worst case, far above an honest delta); a = (4, 3) and c are clipped
    to 2: (1.6, 1.2), (0, 2); median (0, 1.2)."""
    assert parse(StrategyConfig, {}, where="strategy").norm_to_median is True
    ups = [up([4.0, 3.0], "a"), up([0.0, 1.0], "b"), up([0.0, 20.0], "c")]
    strat = FedBuff(StrategyConfig(robust="median", buffer_size=3, norm_bound=2.0, clip_to_median=False), 3)
    result = strat.reduce({"w": np.zeros(2, np.float32)}, ups, None)
    np.testing.assert_allclose(result.model["w"], [0.0, 1.2], rtol=1e-6)
    np.testing.assert_allclose(result.clip_scales, [0.4, 1.0, 0.1], rtol=1e-6)
