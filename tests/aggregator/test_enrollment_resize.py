"""A site revoked (or enrolled) while the aggregator runs: the strategy is sized for the sites now enrolled.

Why: K and the arrivals a buffer waits for (K + f under MDA) follow from the enrollment, and were fixed at start, so
a buffer that awaited every enrolled site waited for a revoked one until ``buffer_timeout_s`` (forever at the
default 0). ``AggregatorCore.take_enrollment`` (called where the enrollment file is reloaded, ``aggregator.grants``)
drops a revoked site's buffered update, resizes the strategy and reduces a buffer that is full without the site,
never summing fewer than ``min_sites``. The end-to-end case over a real Mosquitto is in
``tests/aggregator/test_revocation.py``.

The numbers, by hand: every delta is a constant (0.03, 0.06, 0.09 in every shared parameter), so each norm is that
constant times √P (P shared parameters) and the buffer's median norm is 0.06 √P. Under the mean (three sites:
``robust = "auto"`` keeps the mean, K = 3) the default ``clip_to_median`` clips the 0.09 delta to 0.06 and leaves
the others: the step is (0.03 + 0.06 + 0.06) / 3 = 0.05 in every shared parameter, each site's weight f(0)/K = 1/3.
"""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.core import AggregatorCore
from broker_bridge.keys import KeyPair
from tests.aggregator.helpers import make_federation

SITES = ["site-a", "site-b", "site-c", "site-d"]
DEFAULTS = "min_sites = 3"  # everything else the defaults: buffer_size 10, robust "auto", clip_to_median


def constant(core: AggregatorCore, value: float) -> dict[str, np.ndarray]:
    return {k: np.full(v.shape, value, np.float32) for k, v in core.model.items()}


def send(core: AggregatorCore, fed, site: str, value: float, base: int = 0):
    return core.process(fed.seal(site, constant(core, value), base)[0])


def check_mean_of_three(core: AggregatorCore, before: dict[str, np.ndarray], version: int) -> None:
    """Version ``version`` is ``before`` + 0.05 everywhere (the docstring's hand-worked step), each slot at 1/3."""
    for k, v in core.model.items():
        np.testing.assert_allclose(v, before[k] + 0.05, rtol=0, atol=1e-6)
    lineage = core.lineage(version)
    assert lineage["reduce"] == "mean"
    assert [u["weight"] for u in lineage["updates"]] == [pytest.approx(1 / 3)] * 3


def test_a_buffer_full_without_the_revoked_site_makes_its_version_at_once(tmp_path):
    fed = make_federation(tmp_path, SITES)
    core = AggregatorCore(fed.config(strategy=DEFAULTS))
    try:
        # four enrolled: MDA waits for K + f = 4 and keeps K = 3
        assert (core.strategy.arrivals, core.strategy.buffer_size, core.strategy.reduce_stat) == (4, 3, "mda")
        v0 = {k: v.copy() for k, v in core.model.items()}
        for site, value in zip(SITES, (0.03, 0.06, 0.09)):
            assert send(core, fed, site, value).receipt["verdict"] == "buffered"
        assert core.version == 0 and core.flush_due_in() is None  # no timeout: it would wait for site-d forever
        enrollment = fed.enrollment
        enrollment.revoke("site-d")
        decision = core.take_enrollment(enrollment)
        assert decision is not None and decision.new_version == 1 and core.version == 1
        # three enrolled: min_sites = 3 leaves nothing out, so the mean of all three, K = 3, awaiting three
        assert (core.strategy.arrivals, core.strategy.buffer_size, core.strategy.reduce_stat) == (3, 3, "mean")
        assert sorted((r["site"], r["verdict"]) for r in decision.receipts) == [
            ("site-a", "applied"),
            ("site-b", "applied"),
            ("site-c", "applied"),
        ]
        check_mean_of_three(core, v0, 1)
        assert core.buffer == [] and core.store.buffered() == []
    finally:
        core.close()


def test_a_revoked_sites_buffered_update_leaves_the_buffer_and_the_others_wait(tmp_path):
    fed = make_federation(tmp_path, SITES)
    core = AggregatorCore(fed.config(strategy=DEFAULTS))
    try:
        v0 = {k: v.copy() for k, v in core.model.items()}
        assert send(core, fed, "site-d", 0.12).receipt["verdict"] == "buffered"  # in the buffer when it is revoked
        send(core, fed, "site-a", 0.03)
        enrollment = fed.enrollment
        enrollment.revoke("site-d")
        enrollment.save(fed.root / "enrollment.json")
        assert core.take_enrollment(enrollment) is None  # one update left of three awaited
        assert [u.site for u in core.buffer] == ["site-a"]
        gone = core.store.verdict("site-d", 1)
        assert (gone.verdict, gone.reason) == ("rejected", "unenrolled")  # durable: a resend gets it again
        assert core.metrics.value("fedline_aggregator_rejections_total", {"reason": "unenrolled"}) == 1
        assert [row.site for row, _ in core.store.buffered()] == ["site-a"]
        assert send(core, fed, "site-b", 0.06).new_version is None
        assert (
            send(core, fed, "site-c", 0.09).new_version == 1
        )  # the third of three: site-d's 0.12 is nowhere (with it the step would not be 0.05)
        check_mean_of_three(core, v0, 1)
    finally:
        core.close()


def test_a_restart_after_the_revocation_finds_the_same_buffer(tmp_path):
    fed = make_federation(tmp_path, SITES)
    cfg = fed.config(strategy=DEFAULTS)
    core = AggregatorCore(cfg)
    try:
        send(core, fed, "site-a", 0.03)
        send(core, fed, "site-d", 0.06)
        enrollment = fed.enrollment
        enrollment.revoke("site-d")
        enrollment.save(fed.root / "enrollment.json")
        core.take_enrollment(enrollment)
    finally:
        core.close()
    again = AggregatorCore(cfg)
    try:
        assert [u.site for u in again.buffer] == ["site-a"]
        assert (again.strategy.arrivals, again.strategy.reduce_stat) == (3, "mean")  # sized at start as at runtime
    finally:
        again.close()


def test_below_min_sites_no_buffer_fills(tmp_path):
    """Two sites left of four with min_sites = 3: the start would refuse this enrollment; a running aggregator keeps
    the strategy sized for min_sites, so nothing is reduced, by the full buffer's rule or by a timeout."""
    fed = make_federation(tmp_path, SITES)
    core = AggregatorCore(fed.config(strategy=DEFAULTS + "\nbuffer_timeout_s = 0.01"))
    try:
        send(core, fed, "site-a", 0.03)
        send(core, fed, "site-b", 0.06)
        enrollment = fed.enrollment
        enrollment.revoke("site-c")
        enrollment.revoke("site-d")
        assert core.take_enrollment(enrollment) is None
        assert core.strategy.arrivals == 3 and core.flush() is None and core.version == 0
        assert send(core, fed, "site-b", 0.06).new_version is None  # a newer update supersedes: still two sites
        assert core.version == 0 and len(core.buffer) == 2
    finally:
        core.close()


def test_a_site_enrolled_while_running_is_awaited(tmp_path):
    """Three sites (the mean, three awaited); a fourth enrolled: MDA, four awaited, three kept at 1/3 each."""
    fed = make_federation(tmp_path, SITES[:3])
    core = AggregatorCore(fed.config(strategy=DEFAULTS))
    try:
        assert (core.strategy.arrivals, core.strategy.reduce_stat) == (3, "mean")
        send(core, fed, "site-a", 0.03)
        send(core, fed, "site-b", 0.06)
        enrollment = fed.enrollment
        d = KeyPair.generate("site", "site-d")
        enrollment.add(d.public())
        fed.sites["site-d"] = d
        assert core.take_enrollment(enrollment) is None
        assert (core.strategy.arrivals, core.strategy.buffer_size, core.strategy.reduce_stat) == (4, 3, "mda")
        assert core.metrics.value("fedline_aggregator_reduce", {"reduce": "mda"}) == 1
        assert send(core, fed, "site-c", 0.09).new_version is None  # three of four: waits for site-d
        decision = send(core, fed, "site-d", 0.07)
        assert decision.new_version == 1
        weights = sorted(u["weight"] for u in core.lineage(1)["updates"])
        assert weights == [0.0] + [pytest.approx(1 / 3)] * 3
    finally:
        core.close()
