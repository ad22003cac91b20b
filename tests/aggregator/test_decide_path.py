"""The decide path's per-update shortcuts (issue 19, decide19k) leave what it counts, logs and sizes unchanged.

Why these tests: the metrics' labelled children are cached, per-update log events build their fields only when
their level is on, and the strategy's sizes are worked out where they change instead of on every read. Each could drift from what it replaces without failing a test of
verdicts; these compare each with the slow path it replaced.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
from prometheus_client import generate_latest

from aggregator import mda
from aggregator.core import AggregatorCore
from aggregator.metrics import Metrics
from aggregator.strategies import make_strategy
from tests.aggregator.helpers import make_federation, random_delta


def _exposition(m: Metrics) -> list[str]:
    """The aggregator's own series, less the ``_created`` timestamps (each child's creation time differs) and the
    rate (a function of the clock); the registry's ``process_*`` and ``python_*`` series change on their own."""
    text = generate_latest(m.registry).decode()
    return [
        line
        for line in text.splitlines()
        if line.startswith("fedline_aggregator_")
        and "_created" not in line
        and not line.startswith("fedline_aggregator_updates_per_second")
    ]


def test_decided_counts_as_the_public_calls():
    """The same verdicts counted by :meth:`Metrics.decided` (its cached children) and by prometheus-client's calls."""
    fast, public = Metrics(), Metrics()
    rng = random.Random(0)
    verdicts = [("buffered", None), ("applied", None), ("stale", None), ("rejected", "replay"), ("rejected", "norm")]
    for _ in range(500):
        verdict, reason = rng.choice(verdicts)
        arrival = rng.random() < 0.8
        fast.decided(verdict, reason, arrival=arrival)
        public.updates.labels(verdict).inc()
        if reason:
            public.rejections.labels(reason).inc()
    fast_lines, public_lines = _exposition(fast), _exposition(public)
    assert fast_lines == public_lines
    # and they say something: every verdict and both reasons counted
    assert sum(fast.value("fedline_aggregator_updates_total", {"verdict": v}) for v in {v for v, _ in verdicts}) == 500
    assert fast.value("fedline_aggregator_rejections_total", {"reason": "replay"}) > 0


def test_the_rate_counts_arrivals_only():
    m = Metrics()
    for _ in range(3):
        m.decided("buffered")
    m.decided("applied", arrival=False)
    assert len(m._recent) == 3
    assert m.value("fedline_aggregator_updates_total", {"verdict": "applied"}) == 1


@pytest.mark.parametrize(
    "kind, robust, n_sites, buffer_size",
    [
        ("fedbuff", "none", 5, 3),
        ("fedbuff", "mda", 7, 5),
        ("fedbuff", "auto", 11, 10),
        ("fedavg", "mda", 6, 3),
        ("fedasync", "none", 4, 3),
    ],
)
def test_the_cached_sizes_follow_the_enrollment(kind, robust, n_sites, buffer_size):
    """K, f and the arrivals, cached at start and in resize, equal the formulas the properties used to chain."""
    from aggregator.config import StrategyConfig

    cfg = StrategyConfig(kind=kind, robust=robust, buffer_size=buffer_size, min_sites=1)
    strategy = make_strategy(cfg, n_sites)
    for n in (n_sites, n_sites - 1, 2, 1, n_sites + 3):
        strategy.resize(n)
        left_out = 0
        if strategy.reduce_stat == "mda":
            arrivals, kept = mda.sizes(cfg.mda_f, strategy.capacity, strategy.n_sites, cfg.min_sites)
            left_out = arrivals - kept
        assert strategy.left_out == left_out
        assert strategy.buffer_size == min(strategy.capacity, strategy.n_sites - left_out)
        assert strategy.arrivals == strategy.buffer_size + left_out
        assert strategy.weight(10, 1) == strategy.factor(1) / strategy.buffer_size or kind == "fedasync"


@pytest.fixture
def fed(tmp_path):
    return make_federation(tmp_path, ["site-a", "site-b", "site-c"])


def _run(fed, caplog, level: int):
    """Five updates of three sites into a buffer of 3 (one supersedes, one is too stale): their events and metrics."""
    core = AggregatorCore(fed.config(strategy='kind = "fedbuff"\nbuffer_size = 3\nmax_staleness = 0\nrobust = "none"'))
    rng = np.random.default_rng(1)
    caplog.clear()
    with caplog.at_level(level, logger="fedline.aggregator"):
        for site, counter, base in (("site-a", 1, 0), ("site-a", 2, 0), ("site-b", 1, 0), ("site-c", 1, 0)):
            core.submit(fed.seal(site, random_delta(core.model, rng), base, counter=counter)[0])
        core.submit(fed.seal("site-b", random_delta(core.model, rng), 0, counter=2)[0])  # staleness 1 > 0
        core.submit(fed.seal("site-b", random_delta(core.model, rng), 0, counter=2)[0])  # its duplicate
    events = [
        (r.getMessage(), dict(getattr(r, "fields", {}))) for r in caplog.records if r.name == "fedline.aggregator"
    ]
    metrics = {
        v: core.metrics.value("fedline_aggregator_updates_total", {"verdict": v})
        for v in ("buffered", "stale", "applied")
    }
    metrics["duplicates"] = core.metrics.value("fedline_aggregator_duplicates_total")
    metrics["staleness_sum"] = core.metrics.value("fedline_aggregator_staleness_sum")
    metrics["staleness_count"] = core.metrics.value("fedline_aggregator_staleness_count")
    metrics["fill"] = core.metrics.value("fedline_aggregator_buffer_fill")
    core.close()
    return events, metrics


def test_per_update_events_are_logged_at_info_and_counted_at_any_level(fed, caplog):
    events, metrics = _run(fed, caplog, logging.INFO)
    names = [name for name, _ in events]
    assert names == [
        "update.buffered",
        "update.superseded",
        "update.buffered",
        "update.buffered",
        "model.version",
        "update.stale",
        "update.duplicate",
    ]
    buffered = [fields for name, fields in events if name == "update.buffered"]
    assert buffered[0] == {
        "site": "site-a",
        "counter": 1,
        "staleness": 0,
        "weight": pytest.approx(1 / 3),
        "fill": 1,
        "of": 3,
    }
    assert buffered[1]["fill"] == 1 and buffered[2]["fill"] == 2  # site-a's second took its first one's place
    assert dict(events[1][1]) == {"site": "site-a", "counter": 1, "by": 2}
    assert events[5][1] == {"site": "site-b", "counter": 2, "staleness": 1}
    assert events[6][1] == {"site": "site-b", "counter": 2, "verdict": "stale"}
    expected = {
        "buffered": 3.0,  # a1 (superseded later), a2, b1; c1 made the version
        "stale": 2.0,  # a1 superseded, b2 too stale
        "applied": 3.0,
        "duplicates": 1.0,
        "staleness_sum": 1.0,
        "staleness_count": 5.0,
        "fill": 0.0,
    }
    assert metrics == expected
    quiet_events, quiet_metrics = _run(make_federation(fed.root / "again", list(fed.sites)), caplog, logging.WARNING)
    assert quiet_events == []
    assert quiet_metrics == expected
