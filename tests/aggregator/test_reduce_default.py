"""The coordinate-wise median (``robust = "median"``; the default reduce until 1 Dec 2026, when minimum-diameter
averaging replaced it: tests/aggregator/test_mda.py) and where ``robust = "auto"`` keeps the mean.

The median follows Yin et al. 2018 over FedBuff's scaled slots: Δ̄ = n · med_i(f(s_i) Δ_i / K) for the n
updates reduced (aggregator/strategies/aggregate.py). Every expected number is worked by hand in the
docstrings, from that equation, not with the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.config import StrategyConfig
from aggregator.core import AggregatorCore
from aggregator.strategies import Accepted, FedAvg, FedBuff, make_strategy
from fedline.config import ConfigError, parse
from tests.aggregator.helpers import make_federation


def up(delta: list[float], s: int, factor: float, site: str) -> Accepted:
    return Accepted(site, 1, "m", 0, 10, s, factor, 0.0, {"w": np.array(delta, np.float32)})


@pytest.mark.parametrize(
    "table,n_sites,expected",
    [
        ({}, 4, "mda"),  # FedBuff, K = min(10, 4) = 4
        ({"buffer_size": 3}, 4, "mda"),  # four received, three kept
        # three sites, min_sites 3: leaving one out would sum two (each reads the other's delta): the mean
        ({"buffer_size": 3}, 3, "mean"),
        ({"buffer_size": 2, "min_sites": 2}, 5, "mean"),  # K = 2: a median of two is their mean
        ({"min_sites": 2}, 2, "mean"),  # K clamped to the 2 enrolled sites
        ({"secure_aggregation": True}, 4, "mean"),  # only masked sums: no coordinate to take a median of
        ({"kind": "fedasync", "min_sites": 1}, 4, "mean"),  # one update per reduce
        ({"kind": "fedavg"}, 4, "mda"),  # a round of every enrolled site, one left out
        ({"kind": "fedavg"}, 3, "mean"),  # three: one left out would sum two < min_sites
        ({"kind": "fedavg", "min_sites": 2}, 2, "mean"),
        ({"sample_weighting": True, "sample_cap": 100.0}, 4, "mean"),  # the operator asked for a weighted mean
        ({"robust": "none"}, 4, "mean"),  # explicit settings are kept
        ({"robust": "median", "min_sites": 2}, 2, "median"),
        ({"robust": "trimmed_mean"}, 4, "trimmed_mean"),
    ],
)
def test_the_default_resolves_to_mda_where_it_can_run(table, n_sites, expected):
    cfg = parse(StrategyConfig, table, where="strategy")
    assert make_strategy(cfg, n_sites).reduce_stat == expected


def test_an_explicit_median_with_secure_aggregation_stays_a_config_error():
    with pytest.raises(ConfigError, match=r"robust = 'median' cannot run with secure_aggregation"):
        parse(StrategyConfig, {"secure_aggregation": True, "robust": "median"}, where="strategy")
    assert parse(StrategyConfig, {"secure_aggregation": True}, where="strategy").robust == "auto"


def test_fedbuff_takes_the_median_of_the_staleness_scaled_slots():
    """K = 3, eta_g = 0.5, x = (1, 1); deltas (2, -1) at s=0, (4, 2) at s=3, (9, 3) at s=8, f = 1, 1/2, 1/3:
    f(s_i) Δ_i = (2, -1), (2, 1), (3, 1); coordinate-wise median (2, 1); n/K = 3/3: Δ̄ = (2, 1);
    x = 1 + 0.5 * (2, 1) = (2, 1.5). (The mean gives (2.1666667, 1.1666667): tests/aggregator/test_formulas.py.)"""
    strat = FedBuff(
        StrategyConfig(kind="fedbuff", robust="median", buffer_size=3, server_lr=0.5, clip_to_median=False), 3
    )
    assert strat.reduce_stat == "median"
    ups = [up([2.0, -1.0], 0, 1.0, "a"), up([4.0, 2.0], 3, 0.5, "b"), up([9.0, 3.0], 8, 1 / 3, "c")]
    out = strat.reduce({"w": np.ones(2, np.float32)}, ups, None).model
    np.testing.assert_allclose(out["w"], [2.0, 1.5], rtol=1e-6)
    assert [u.weight for u in ups] == pytest.approx([1 / 3, 1 / 6, 1 / 9])  # the 1/K share is unchanged


def test_a_buffer_closed_early_moves_n_over_k_of_the_median():
    """K = 4, three updates (a timed-out buffer), the same slots: (n/K) · med = (3/4)(2, 1) = (1.5, 0.75);
    x = 1 + 0.5 * (1.5, 0.75) = (1.75, 1.375), as the mean would move 3/4 of its full-buffer step."""
    strat = FedBuff(
        StrategyConfig(kind="fedbuff", robust="median", buffer_size=4, server_lr=0.5, clip_to_median=False), 4
    )
    ups = [up([2.0, -1.0], 0, 1.0, "a"), up([4.0, 2.0], 3, 0.5, "b"), up([9.0, 3.0], 8, 1 / 3, "c")]
    out = strat.reduce({"w": np.ones(2, np.float32)}, ups, None).model
    np.testing.assert_allclose(out["w"], [1.75, 1.375], rtol=1e-6)


def test_a_fedavg_round_takes_the_median():
    """A round of three, deltas 1, 2, 30 (one site far out): median 2 (the mean would be 11); x = 0 + 2."""
    strat = FedAvg(StrategyConfig(kind="fedavg", robust="median", clip_to_median=False), 3)
    ups = [up([v], 0, 1.0, s) for v, s in ((1.0, "a"), (2.0, "b"), (30.0, "c"))]
    assert strat.reduce({"w": np.zeros(1, np.float32)}, ups, None).model["w"][0] == pytest.approx(2.0)


def test_the_aggregator_reduces_with_mda_by_default_and_says_so(tmp_path):
    """Three sealed updates filling every coordinate with 0.01, 0.02 and 0.3 (norms 0.063, 0.126, 1.90 over
    the 40 shared values), defaults otherwise (clip_to_median, norm_to_median): every delta is rescaled to the
    median norm, i.e. to 0.02 per coordinate; all three then agree, MDA keeps the first two (diameter 0) and
    the step is 3 · mean(0.02/3, 0.02/3) = 0.02 per value, the mean's. The lineage and the metric name MDA."""
    fed = make_federation(tmp_path, ["a1", "a2", "a3"])
    core = AggregatorCore(fed.config())
    # three enrolled: all three received, K = 2 kept (f = 1)
    assert (core.strategy.arrivals, core.strategy.buffer_size, core.strategy.reduce_stat) == (3, 2, "mda")
    base = {k: v.copy() for k, v in core.model.items()}
    receipts = [
        core.submit(fed.seal(s, {k: np.full(v.shape, c, np.float32) for k, v in base.items()}, 0)[0])
        for s, c in (("a1", 0.01), ("a2", 0.02), ("a3", 0.3))
    ]
    assert [r["verdict"] for r in receipts] == ["buffered", "buffered", "applied"]
    for k in base:
        np.testing.assert_allclose(core.model[k], base[k] + 0.02, rtol=1e-5, atol=1e-6)
    assert core.lineage(1)["reduce"] == "mda"
    assert [u["weight"] for u in core.lineage(1)["updates"]] == [pytest.approx(0.5), pytest.approx(0.5), 0.0]
    assert core.metrics.registry.get_sample_value("fedline_aggregator_reduce", {"reduce": "mda"}) == 1
    core.close()
