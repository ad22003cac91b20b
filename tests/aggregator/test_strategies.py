"""The reduce step's math: each strategy follows its formula, step by step, on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import robust, staleness
from aggregator.config import StrategyConfig
from aggregator.core import AggregatorCore
from aggregator.strategies import Accepted, FedAvg, FedBuff, make_strategy
from tests.aggregator.helpers import make_federation, random_delta


def acc(delta, n=10, s=0, weight=None, factor=1.0, site="s"):
    return Accepted(site, 1, "m", 0, n, s, factor, float(n) if weight is None else weight, delta)


# -- staleness functions -------------------------------------------------------------
@given(
    kind=st.sampled_from(["constant", "polynomial", "hinge"]),
    a=st.floats(0, 3),
    b=st.floats(0, 10),
    s=st.integers(0, 1000),
)
def test_staleness_functions_start_at_one_never_exceed_it_and_never_increase(kind, a, b, s):
    f = staleness.make(kind, a, b)
    assert f(0) == 1.0
    assert 0.0 < f(s) <= 1.0
    assert f(s + 1) <= f(s)


def test_staleness_formulas():
    assert staleness.make("polynomial", 0.5)(3) == pytest.approx(4**-0.5)
    hinge = staleness.make("hinge", 2.0, 4.0)
    assert hinge(4) == 1.0 and hinge(6) == pytest.approx(1 / (2 * 2 + 1))
    assert staleness.make("constant")(100) == 1.0
    with pytest.raises(ValueError, match="unknown staleness"):
        staleness.make("linear")


# -- FedAvg with sample weighting = McMahan's sample-weighted mean (when no claim reaches the cap) ----------
shapes = st.lists(st.tuples(st.integers(1, 5), st.integers(1, 7)), min_size=1, max_size=3)


@settings(max_examples=40, deadline=None)
@given(shapes=shapes, n_sites=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_fedavg_with_sample_weighting_equals_sample_weighted_mean_of_deltas(shapes, n_sites, seed):
    rng = np.random.default_rng(seed)
    model = {f"p{i}": rng.standard_normal(sh).astype(np.float32) for i, sh in enumerate(shapes)}
    deltas = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in model.items()} for _ in range(n_sites)]
    samples = rng.integers(1, 1000, n_sites)
    strat = FedAvg(StrategyConfig(kind="fedavg", sample_weighting=True, sample_cap=1000, clip_to_median=False), n_sites)
    assert strat.buffer_size == n_sites
    ups = [acc(d, int(n), s=int(rng.integers(0, 5)), weight=strat.weight(int(n), 3)) for d, n in zip(deltas, samples)]
    out = strat.reduce(model, ups, None).model
    for k in model:
        expected = (
            model[k].astype(np.float64)
            + sum(n * d[k].astype(np.float64) for d, n in zip(deltas, samples)) / samples.sum()
        )
        np.testing.assert_allclose(out[k], expected, rtol=1e-5, atol=1e-5)
        assert out[k].dtype == np.float32


def test_fedavg_end_to_end_sealed_updates_one_round(tmp_path):
    """One round of four: with sample weighting and the aggregator's cap (100), a site claiming 500 counts as 100."""
    fed = make_federation(tmp_path, ["a1", "a2", "a3", "a4"])
    core = AggregatorCore(
        fed.config(
            strategy='kind = "fedavg"\nstaleness = "polynomial"\na = 2.0\n'
            "sample_weighting = true\nsample_cap = 100\nclip_to_median = false"
        )
    )
    rng = np.random.default_rng(3)
    base = {k: v.copy() for k, v in core.model.items()}
    deltas = [random_delta(base, rng, 0.1) for _ in range(4)]
    samples = [5, 50, 500, 7]
    receipts = [core.submit(fed.seal(s, d, 0, n)[0]) for s, d, n in zip(["a1", "a2", "a3", "a4"], deltas, samples)]
    assert [r["verdict"] for r in receipts] == ["buffered"] * 3 + ["applied"]
    assert core.version == 1
    capped = [5, 50, 100, 7]
    for k in base:
        mean = sum(n * d[k].astype(np.float64) for d, n in zip(deltas, capped)) / sum(capped)
        np.testing.assert_allclose(core.model[k], base[k] + mean, rtol=1e-5, atol=1e-6)
    core.close()


# -- FedAsync step by step ----------------------------------------------------------
def test_fedasync_mixes_each_update_with_alpha_times_f_of_staleness(tmp_path):
    """Xie et al.: x_t = (1 - a_t) x_{t-1} + a_t (x_base + delta), a_t = alpha f(s), from the kept versions."""
    fed = make_federation(tmp_path, ["a1", "a2"])
    core = AggregatorCore(
        fed.config(strategy='kind = "fedasync"\nalpha = 0.6\nstaleness = "hinge"\na = 0.5\nb = 1\nsite_interval_s = 0')
    )  # the per-site rate limit off: the paper's rule alone (the limit: tests/aggregator/test_site_rate.py)
    rng = np.random.default_rng(4)
    x = {k: v.astype(np.float64) for k, v in core.model.items()}
    history = [{k: v.copy() for k, v in x.items()}]
    f = staleness.make("hinge", 0.5, 1.0)
    bases = [0, 0, 1, 0, 2, 5, 3]
    for step, base in enumerate(bases):
        d = random_delta(core.model, rng, 0.1)
        r = core.submit(fed.seal("a1" if step % 2 else "a2", d, base, n_samples=3 + step)[0])
        s = step - base
        assert (r["verdict"], r["version"], r["staleness"]) == ("applied", step + 1, s)
        assert r["weight"] == pytest.approx(0.6 * f(s))
        a_t = 0.6 * f(s)
        for k in x:
            x[k] = (1 - a_t) * x[k] + a_t * (history[base][k] + d[k])
            np.testing.assert_allclose(core.model[k], x[k], rtol=1e-5, atol=1e-6)
        history.append({k: v.copy() for k, v in x.items()})
    lineage = core.lineage(5)
    assert lineage["parent"] == 4 and lineage["updates"][0]["staleness"] == 2
    core.close()


# -- FedBuff step by step, with server learning rate and momentum ------------------------------
def test_fedbuff_buffers_k_then_steps_by_the_staleness_scaled_sum_over_k_with_lr_and_momentum(tmp_path):
    """Nguyen et al. Alg. 1: x <- x + lr * (1/K) sum f(s_i) delta_i (here with FedAvgM momentum); the claimed
    sample counts do not enter. (This test encoded the first, normalised formula; corrected, issue 14.)"""
    fed = make_federation(tmp_path, ["a1", "a2", "a3"])
    core = AggregatorCore(
        fed.config(
            strategy='kind = "fedbuff"\nbuffer_size = 3\nstaleness = "polynomial"\na = 0.5\nserver_lr = 0.7\n'
            'server_momentum = 0.9\nclip_to_median = false\nrobust = "none"'  # the paper's mean, not the default robust reduce
        )
    )
    rng = np.random.default_rng(6)
    x = {k: v.astype(np.float64) for k, v in core.model.items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    sites = ["a1", "a2", "a3"]
    for rnd in range(3):
        pending = []
        for j in range(3):
            base = max(0, rnd - j)
            s = rnd - base
            d = random_delta(core.model, rng, 0.1)
            n = int(rng.integers(1, 100))
            r = core.submit(fed.seal(sites[j], d, base, n)[0])
            pending.append(((s + 1) ** -0.5, d))
            assert r["verdict"] == ("applied" if j == 2 else "buffered")
            assert r["weight"] == pytest.approx((s + 1) ** -0.5 / 3)
        for k in x:
            mean = sum(w * d[k] for w, d in pending) / 3
            m[k] = 0.9 * m[k] + mean
            x[k] = x[k] + 0.7 * m[k]
            np.testing.assert_allclose(core.model[k], x[k], rtol=1e-4, atol=1e-6)
        assert core.version == rnd + 1
    core.close()


# -- robust reduce with one poisoned sender of ten -----------------------------------------
def _ten_senders(rng, poison_scale: float):
    """Nine honest deltas around a common direction, and a tenth scaled-up and flipped."""
    model = {"w": np.zeros((40, 25), np.float32), "b": np.zeros(25, np.float32)}
    direction = {k: rng.standard_normal(v.shape).astype(np.float32) * 0.1 for k, v in model.items()}
    honest = [
        {k: direction[k] + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in model.items()}
        for _ in range(10)
    ]
    poisoned = list(honest)
    poisoned[9] = {k: -poison_scale * v for k, v in honest[9].items()}
    return model, honest, poisoned


def _dist(a, b):
    return robust.l2_norm({k: a[k] - b[k] for k in a})


@pytest.mark.parametrize(
    "options,bound",
    [
        ({"robust": "median"}, 0.25),
        ({"robust": "trimmed_mean", "trim": 0.1}, 0.25),
        ({"robust": "none", "norm_bound": 3.0}, 0.5),
    ],
)
def test_robust_reduce_keeps_model_near_the_clean_run_with_one_of_ten_poisoned(options, bound):
    """Stated distance: within ``bound`` × the clean step's norm; the plain mean is pushed > 5× away."""
    rng = np.random.default_rng(11)
    model, honest, poisoned = _ten_senders(rng, poison_scale=100.0)
    cfg = StrategyConfig(kind="fedbuff", buffer_size=10, **options)
    strat = FedBuff(cfg)
    clean = strat.reduce(model, [acc(d, 10) for d in honest], None).model
    attacked = strat.reduce(model, [acc(d, 10) for d in poisoned], None).model
    step = robust.l2_norm(clean)
    assert _dist(attacked, clean) <= bound * step
    plain = FedBuff(StrategyConfig(kind="fedbuff", buffer_size=10, clip_to_median=False, robust="none"))
    plain_clean = plain.reduce(model, [acc(d, 10) for d in honest], None).model
    plain_attacked = plain.reduce(model, [acc(d, 10) for d in poisoned], None).model
    assert _dist(plain_attacked, plain_clean) > 5 * robust.l2_norm(plain_clean)


def test_norm_bound_clips_to_the_bound_and_records_the_scale():
    d = {"w": np.full((10,), 3.0, np.float32)}  # norm ~9.49
    strat = FedBuff(StrategyConfig(kind="fedbuff", buffer_size=1, norm_bound=1.0))
    res = strat.reduce({"w": np.zeros(10, np.float32)}, [acc(d)], None)
    assert robust.l2_norm(res.model) == pytest.approx(1.0, rel=1e-5)
    assert res.clip_scales[0] == pytest.approx(1.0 / np.sqrt(90))


def test_trimmed_mean_and_median_formulas():
    ds = [{"w": np.array([v], np.float32)} for v in (1, 2, 3, 4, 100)]
    assert robust.median(ds)["w"][0] == 3
    assert robust.trimmed_mean(ds, 0.2)["w"][0] == pytest.approx(3.0)  # drops 1 and 100
    assert robust.trimmed_mean(ds, 0.0)["w"][0] == pytest.approx(22.0)


def test_make_strategy_picks_by_kind():
    assert make_strategy(StrategyConfig(kind="fedasync"), 3).buffer_size == 1
    # MDA (the default) waits for K + 1 and sums K; with fewer sites, all of them and K = sites − 1 (one per site),
    # but never fewer than min_sites (3): at three sites the mean of all three
    seven = make_strategy(StrategyConfig(kind="fedbuff", buffer_size=7), 9)
    assert (seven.buffer_size, seven.arrivals) == (7, 8)
    clamped = make_strategy(StrategyConfig(kind="fedbuff", buffer_size=7), 4)
    assert (clamped.reduce_stat, clamped.buffer_size, clamped.arrivals) == ("mda", 3, 4)
    three = make_strategy(StrategyConfig(kind="fedbuff", buffer_size=7), 3)
    assert (three.reduce_stat, three.buffer_size, three.arrivals) == ("mean", 3, 3)
    mean = make_strategy(StrategyConfig(kind="fedbuff", buffer_size=7, robust="none"), 3)
    assert (mean.buffer_size, mean.arrivals) == (3, 3)  # the mean sums all it waits for
    fedavg = make_strategy(StrategyConfig(kind="fedavg"), 4)
    assert (fedavg.buffer_size, fedavg.arrivals) == (3, 4)
    assert make_strategy(StrategyConfig(kind="fedavg"), 3).buffer_size == 3


@pytest.mark.parametrize("robust_opt", ['robust = "trimmed_mean"\ntrim = 0.1', 'robust = "median"'])
def test_ten_sealed_senders_one_poisoned_over_rounds_stays_near_the_clean_run(tmp_path, robust_opt):
    """End to end through sealing, intake and FedBuff(K=10) over 3 rounds: the poisoned run's model stays
    within 0.3 × the clean run's total movement of the clean model (the unit test above shows the plain
    mean is pushed more than 5× the step away by the same attack)."""
    sites = [f"s{i}" for i in range(10)]
    fed = make_federation(tmp_path / "fed", sites)
    strategy = f'kind = "fedbuff"\nbuffer_size = 10\n{robust_opt}'
    extra = "[validation]\nmax_norm = 1e6"
    clean = AggregatorCore(fed.config(strategy=strategy, extra=extra, state_dir="clean", name="c.toml"))
    attacked = AggregatorCore(fed.config(strategy=strategy, extra=extra, state_dir="attacked", name="a.toml"))
    start = {k: v.copy() for k, v in clean.model.items()}
    rng = np.random.default_rng(21)
    for rnd in range(3):
        direction = random_delta(start, rng, 0.1)
        for i, s in enumerate(sites):
            honest = {k: direction[k] + random_delta({k: v}, rng, 0.03)[k] for k, v in direction.items()}
            clean.submit(fed.seal(s, honest, rnd, n_samples=50, counter=rnd + 1)[0])
            evil = {k: -50.0 * v for k, v in honest.items()} if i == 9 else honest
            attacked.submit(fed.seal(s, evil, rnd, n_samples=50, counter=rnd + 1)[0])
    assert clean.version == attacked.version == 3
    moved = _dist(clean.model, start)
    assert _dist(attacked.model, clean.model) <= 0.3 * moved
    clean.close()
    attacked.close()
