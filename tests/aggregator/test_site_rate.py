"""FedAsync's per-site rate limit (aggregator.site_rate): a site that sends fast gains no influence."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.core import AggregatorCore
from tests.aggregator.helpers import make_federation, random_delta


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_site_sending_faster_than_its_interval_gets_a_proportionally_smaller_alpha(tmp_path) -> None:
    """x_t = (1 − α_t) x_{t−1} + α_t (x_τ + Δ) with α_t = α f(s) r, r = min(1, Δt / interval), by hand."""
    fed = make_federation(tmp_path, ["fast", "slow"])
    core = AggregatorCore(
        fed.config(strategy='kind = "fedasync"\nalpha = 0.5\nstaleness = "constant"\nsite_interval_s = 10')
    )
    clock = core.site_rate.clock = Clock()
    rng = np.random.default_rng(0)
    x = {k: v.astype(np.float64) for k, v in core.model.items()}
    # (site, seconds since the previous update of anyone, expected α_t): first updates count in full; "fast"
    # again 2 s after its first gets 0.5 × 2/10; "slow" 5.5 s after its first 0.5 × 0.55; "fast" 6 s after
    # its second 0.5 × 0.6
    plan = [("fast", 0.0, 0.5), ("slow", 0.5, 0.5), ("fast", 1.5, 0.1), ("slow", 4.0, 0.275), ("fast", 2.0, 0.3)]
    for step, (site, dt, alpha_t) in enumerate(plan):
        clock.t += dt
        d = random_delta(core.model, rng, 0.1)
        r = core.submit(fed.seal(site, d, step)[0])  # trained on the current version: staleness 0
        assert (r["verdict"], r["version"]) == ("applied", step + 1)
        assert r["weight"] == pytest.approx(alpha_t)
        for k in x:
            x[k] = (1 - alpha_t) * x[k] + alpha_t * (x[k] + d[k])  # base = x_{t-1} (staleness 0)
            np.testing.assert_allclose(core.model[k], x[k], rtol=1e-5, atol=1e-6)
        assert core.lineage(step + 1)["updates"][0]["rate"] == pytest.approx(alpha_t / 0.5)
    core.close()


def test_ten_updates_in_one_interval_weigh_about_one(tmp_path) -> None:
    """A flood of 10 updates 1 s apart (interval 10 s) sums to α once, not 10 α."""
    fed = make_federation(tmp_path, ["flood"])
    core = AggregatorCore(fed.config(strategy='kind = "fedasync"\nalpha = 0.5\nstaleness = "constant"'))
    clock = core.site_rate.clock = Clock()
    assert core.site_rate.interval_s == 60.0  # on by default
    core.site_rate.interval_s = 10.0
    rng = np.random.default_rng(1)
    weights = []
    for step in range(11):
        r = core.submit(fed.seal("flood", random_delta(core.model, rng, 0.1), step)[0])
        weights.append(r["weight"])
        clock.t += 1.0
    assert weights[0] == pytest.approx(0.5) and sum(weights[1:]) == pytest.approx(0.5)  # 10 × 0.5 × 1/10
    core.close()


def test_restore_turns_the_wall_clock_age_of_each_last_update_into_the_rate_by_hand() -> None:
    from aggregator.site_rate import SiteRate

    clock = Clock()  # monotonic 1000 at the restart
    rate = SiteRate(10.0, clock=clock)
    # last applied (wall clock): "a" 2 s before the restart, "b" 7 s, "c" 30 s, "d" 5 s in the future (a clock
    # stepped back: counts as no time elapsed)
    rate.restore({"a": 998.0, "b": 993.0, "c": 970.0, "d": 1005.0}, wall_now=1000.0)
    assert [rate.scale(s) for s in "abcde"] == pytest.approx([0.2, 0.7, 1.0, 0.0, 1.0])  # "e": never applied
    clock.t += 5.0
    assert [rate.scale(s) for s in "abcd"] == pytest.approx([0.7, 1.0, 1.0, 0.5])


def test_the_rate_outlives_an_aggregator_restart(tmp_path) -> None:
    """The in-process core over the real SQLite store, closed and opened again: a site that just sent gets
    no full-weight update from the restart (before this, every restart gave each site one)."""
    import time

    fed = make_federation(tmp_path, ["fast", "slow"])
    cfg = fed.config(strategy='kind = "fedasync"\nalpha = 0.5\nstaleness = "constant"\nsite_interval_s = 3600')
    rng = np.random.default_rng(2)
    core = AggregatorCore(cfg)
    r = core.submit(fed.seal("fast", random_delta(core.model, rng, 0.1), 0)[0])
    assert (r["verdict"], r["weight"]) == ("applied", pytest.approx(0.5))  # its first: in full
    t_applied = core.store.last_applied()["fast"]  # written with the version's commit
    core.close()

    before_restart = time.time()
    core = AggregatorCore(cfg)  # the same state directory
    assert core.version == 1
    r = core.submit(fed.seal("fast", random_delta(core.model, rng, 0.1), 1)[0])
    after = time.time()
    # α_t = 0.5 × (seconds since its last applied update) / 3600, those seconds between the two wall times
    assert r["verdict"] == "applied"
    assert 0.5 * (before_restart - t_applied) / 3600 - 1e-9 <= r["weight"] <= 0.5 * (after - t_applied) / 3600 + 1e-9
    assert r["weight"] < 0.01
    r = core.submit(fed.seal("slow", random_delta(core.model, rng, 0.1), 2)[0])
    assert r["weight"] == pytest.approx(0.5)  # a site with nothing applied yet: in full
    core.close()
