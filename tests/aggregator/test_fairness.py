"""One site cannot steer the global model: one update per site per buffer, min_sites, derived norm bounds."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.config import DPConfig
from aggregator.core import AggregatorCore
from aggregator.fairness import FairnessError
from aggregator.normbound import honest_bound
from fedline.config import ConfigError
from tests.aggregator.helpers import make_federation, random_delta

SITES = ["site-a", "site-b", "site-c", "site-d"]


def test_a_second_update_from_a_site_supersedes_its_first_and_both_get_receipts(tmp_path):
    fed = make_federation(tmp_path, SITES)
    core = AggregatorCore(fed.config(strategy="min_sites = 3\nbuffer_size = 3"))
    rng = np.random.default_rng(0)
    try:
        first = core.process(fed.seal("site-a", random_delta(core.model, rng), 0)[0])
        assert first.receipt["verdict"] == "buffered"
        # K back to back from the same site: each takes the previous one's place, the buffer never fills
        for _ in range(3):
            d = core.process(fed.seal("site-a", random_delta(core.model, rng), 0)[0])
            assert d.receipt["verdict"] == "buffered"
            assert [(r["verdict"], r["reason"]) for r in d.flushed] == [("stale", "superseded")]
        assert core.version == 0 and [u.site for u in core.buffer] == ["site-a"]
        assert core.store.verdict("site-a", 1).reason == "superseded"  # durable, a resend gets it again
        core.process(fed.seal("site-b", random_delta(core.model, rng), 0)[0])
        # the default MDA waits for K + 1 = 4 (one per site) and keeps K = 3
        assert core.process(fed.seal("site-c", random_delta(core.model, rng), 0)[0]).new_version is None
        d = core.process(fed.seal("site-d", random_delta(core.model, rng), 0)[0])
        assert d.new_version == 1
        assert sorted(u["site"] for u in core.lineage(1)["updates"]) == SITES
        # the farthest slot left out, each kept one at exactly its fair share f(s)/K = 1/3
        assert sorted(u["weight"] for u in core.lineage(1)["updates"]) == [0.0] + [pytest.approx(1 / 3)] * 3
    finally:
        core.close()


def test_a_timed_out_buffer_waits_for_min_sites_distinct_sites(tmp_path):
    fed = make_federation(tmp_path, SITES)
    core = AggregatorCore(fed.config(strategy="min_sites = 3\nbuffer_size = 4\nbuffer_timeout_s = 0.01"))
    rng = np.random.default_rng(1)
    try:
        for s in ("site-a", "site-b"):
            core.process(fed.seal(s, random_delta(core.model, rng), 0)[0])
        import time

        time.sleep(0.05)
        assert core.flush_due_in() is None and core.flush() is None and core.version == 0  # two sites: waits
        core.process(fed.seal("site-c", random_delta(core.model, rng), 0)[0])
        assert core.flush_due_in() == 0.0
        assert core.flush().new_version == 1
    finally:
        core.close()


def test_fedasync_needs_min_sites_one_and_an_enrollment_below_min_sites_is_refused(tmp_path):
    fed = make_federation(tmp_path, ["site-a", "site-b"])
    with pytest.raises(ConfigError, match="min_sites = 1 to accept that leak"):
        fed.config(strategy='kind = "fedasync"\nmin_sites = 3')
    with pytest.raises(FairnessError, match="2 enrolled site.*min_sites is 3"):
        AggregatorCore(fed.config(strategy="min_sites = 3\nbuffer_size = 3"))
    with pytest.raises(ConfigError, match="buffer_size .2. must be at least min_sites .3."):
        fed.config(strategy="min_sites = 3\nbuffer_size = 2")


def test_norm_bound_from_dp_settings_by_hand():
    """C = 1, lr = 0.1, T = 50, beta = 0, sigma = 1, B = 25, d = 200:
    0.1 * 1 * 50 = 5, plus 0.1 * 1 * 1 * sqrt(200 * 50) / 25 = 0.1 * 100 / 25 = 0.4: 5.4.
    With momentum 0.5 both terms double: 10.8."""
    dp = DPConfig(clip_norm=1.0, noise_multiplier=1.0, lr=0.1, momentum=0.0, batch_size=25, steps=50)
    assert honest_bound(dp, 200) == pytest.approx(5.4)
    assert honest_bound(DPConfig(1.0, 1.0, 0.1, 0.5, 25, 50), 200) == pytest.approx(10.8)


def test_default_bounds_clip_and_refuse_by_the_dp_settings(tmp_path):
    fed = make_federation(tmp_path, SITES)
    core = AggregatorCore(
        fed.config(
            strategy="min_sites = 3\nbuffer_size = 3\nclip_to_median = false",
            extra="[dp]\nclip_norm = 1.0\nlr = 0.01\nsteps = 10\nnoise_multiplier = 0.0",
        )
    )
    try:
        assert core.norm_bound == pytest.approx(0.1) and core.max_norm == pytest.approx(0.4)
        big = {k: np.full(v.shape, 1.0, np.float32) for k, v in core.model.items()}
        assert core.process(fed.seal("site-a", big, 0)[0]).receipt["reason"] == "norm"  # > max_norm: refused
        long = {k: v * np.float32(0.3 / np.sqrt(sum(x.size for x in big.values()))) for k, v in big.items()}
        before = {k: v.copy() for k, v in core.model.items()}
        for s in SITES:  # each 0.3 long: clipped to 0.1; MDA keeps three of the four, 1/3 each
            core.process(fed.seal(s, long, 0)[0])
        moved = np.sqrt(sum(float(((core.model[k] - before[k]) ** 2).sum()) for k in before))
        assert moved == pytest.approx(0.1, rel=1e-4)
    finally:
        core.close()
