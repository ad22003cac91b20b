"""Each strategy's rule against numbers worked by hand from the papers' own equations (issue 14).

FedBuff (Nguyen et al. 2022, Alg. 1): x <- x + eta_g * (1/K) * sum_i f(s_i) * delta_i.
FedAsync (Xie et al. 2019, Alg. 1): x_t = (1 - alpha_t) x_{t-1} + alpha_t x_new, alpha_t = alpha f(t - tau),
x_new = x_tau + delta. The staleness function is the polynomial f(s) = (s + 1)^(-a) with a = 0.5 unless said.
Every expected number below was computed by hand (shown in the comments), not with the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.config import StrategyConfig
from aggregator.strategies import Accepted, FedAsync, FedBuff, aggregate


def up(delta: float | list[float], s: int, factor: float, site: str = "s", n: int = 10, base=None) -> Accepted:
    d = {"w": np.array(delta if isinstance(delta, list) else [delta], np.float32)}
    return Accepted(site, 1, "m", 0, n, s, factor, 0.0, d, None, base)


def fedbuff(k: int, **kw) -> FedBuff:
    """The paper's mean: ``robust = "none"`` (the default takes minimum-diameter averaging at K >= 3: test_reduce_default.py)."""
    kw.setdefault("robust", "none")
    return FedBuff(StrategyConfig(kind="fedbuff", buffer_size=k, min_sites=1, clip_to_median=False, **kw))


@pytest.mark.parametrize(
    "s,expected",
    [
        (0, 1.0),  # f(0) = 1^-0.5 = 1
        (3, 0.5),  # f(3) = 4^-0.5 = 1/2
        (8, 1 / 3),  # f(8) = 9^-0.5 = 1/3
    ],
)
def test_fedbuff_single_update_moves_by_f_of_s(s, expected):
    """K = 1, delta = 1, x = 0: the new x is f(s) (the normalised formula gave 1 at every staleness)."""
    strat = fedbuff(1)
    out = strat.reduce({"w": np.zeros(1, np.float32)}, [up(1.0, s, strat.factor(s))], None).model
    assert out["w"][0] == pytest.approx(expected, rel=1e-6)


def test_fedbuff_three_updates_all_at_staleness_two_move_by_f_of_two():
    """K = 3, deltas 3, 6, 9 at s = 2: (1/3)(3 + 6 + 9) / sqrt(3) = 6 / 1.7320508 = 3.4641016 (not 6)."""
    strat = fedbuff(3)
    ups = [up(d, 2, strat.factor(2), site=f"s{i}") for i, d in enumerate((3.0, 6.0, 9.0))]
    out = strat.reduce({"w": np.zeros(1, np.float32)}, ups, None).model
    assert out["w"][0] == pytest.approx(3.4641016, rel=1e-6)


def test_fedbuff_mixed_buffer_with_server_lr():
    """K = 3, eta_g = 0.5, x = 1; deltas (2, -1) at s=0, (4, 2) at s=3, (9, 3) at s=8:
    (1/3)[1*(2,-1) + 0.5*(4,2) + (1/3)*(9,3)] = (1/3)(2+2+3, -1+1+1) = (7/3, 1/3);
    x = 1 + 0.5 * (7/3, 1/3) = (2.1666667, 1.1666667)."""
    strat = fedbuff(3, server_lr=0.5)
    ups = [up([2.0, -1.0], 0, 1.0, "a"), up([4.0, 2.0], 3, 0.5, "b"), up([9.0, 3.0], 8, 1 / 3, "c")]
    out = strat.reduce({"w": np.ones(2, np.float32)}, ups, None).model
    np.testing.assert_allclose(out["w"], [2.1666667, 1.1666667], rtol=1e-6)
    assert [u.weight for u in ups] == pytest.approx([1 / 3, 1 / 6, 1 / 9])


def test_fedbuff_sample_weighting_normalises_by_capped_samples_never_by_f():
    """n = 100, 300, 10**7 with cap 300 -> weights 100, 300, 300 -> p = 1/7, 3/7, 3/7; f = 1, 1/2, 1;
    deltas 7, 7, 7: step = 7 * (1/7 + 3/14 + 3/7) = 1 + 1.5 + 3 = 5.5 (a division by sum p f would give 7)."""
    strat = fedbuff(3, sample_weighting=True, sample_cap=300)
    ups = [up(7.0, 0, 1.0, "a", 100), up(7.0, 3, 0.5, "b", 300), up(7.0, 0, 1.0, "c", 10_000_000)]
    out = strat.reduce({"w": np.zeros(1, np.float32)}, ups, None).model
    assert out["w"][0] == pytest.approx(5.5, rel=1e-6)


def test_fedasync_alpha_term_pulls_towards_the_stale_base():
    """alpha = 0.5, f(s=3) = 1/2 -> alpha_t = 0.25; x_{t-1} = 10, x_tau = 2, delta = 1:
    x_t = 0.75 * 10 + 0.25 * (2 + 1) = 7.5 + 0.75 = 8.25. The delta form gives 10 + 0.25 = 10.25."""
    cfg = StrategyConfig(kind="fedasync", alpha=0.5, min_sites=1, clip_to_median=False)
    strat = FedAsync(cfg, 2)
    u = up(1.0, 3, strat.factor(3), base={"w": np.array([2.0], np.float32)})
    out = strat.reduce({"w": np.array([10.0], np.float32)}, [u], None).model
    assert out["w"][0] == pytest.approx(8.25, rel=1e-6) and u.weight == pytest.approx(0.25)
    delta_form = FedAsync(StrategyConfig(kind="fedasync", alpha=0.5, min_sites=1, fedasync_form="delta"), 2)
    out = delta_form.reduce({"w": np.array([10.0], np.float32)}, [up(1.0, 3, 0.5)], None).model
    assert out["w"][0] == pytest.approx(10.25, rel=1e-6)


@pytest.mark.parametrize("s,hand", [(0, 6.0), (3, 8.0), (8, 8.6666667)])
def test_fedasync_fresh_and_stale_updates(s, hand):
    """alpha = 0.5, x_{t-1} = 10, x_tau = 0, delta = 2 (x_new = 2):
    s=0: alpha_t = 0.5: 0.5*10 + 0.5*2 = 6; s=3: alpha_t = 0.25: 7.5 + 0.5 = 8;
    s=8: alpha_t = 1/6: (5/6)*10 + (1/6)*2 = 8.6666667."""
    strat = FedAsync(StrategyConfig(kind="fedasync", alpha=0.5, min_sites=1), 2)
    u = up(2.0, s, strat.factor(s), base={"w": np.zeros(1, np.float32)})
    out = strat.reduce({"w": np.array([10.0], np.float32)}, [u], None).model
    assert out["w"][0] == pytest.approx(hand, rel=1e-6)


def test_sample_shares_and_uniform_coefficients_by_hand():
    assert aggregate.sample_shares([1, 3, 10**7], cap=3) == pytest.approx([1 / 7, 3 / 7, 3 / 7])
    assert aggregate.uniform_coefficients([1.0, 0.5], 4) == pytest.approx([0.25, 0.125])
    with pytest.raises(ValueError, match="sample cap"):
        aggregate.sample_shares([1], cap=0)
