"""Minimum-diameter averaging (aggregator/mda.py; El-Mhamdi, Guerraoui and Rouault, ICLR 2021) as ``robust = "mda"``,
the default reduce wherever a buffer has three slots or more (issue 14).

A buffer waits for ``K + f`` updates (``buffer_size`` is FedBuff's K, the slots a version sums; fewer sites
enrolled: all of them, ``f`` left out) and keeps K: of the subsets of ``n − f`` received slots, the one whose
largest pairwise L2 distance (measured between the deltas) is smallest, and the step is ``Σ_{i ∈ S} c_i Δ_i``
with FedBuff's ``c_i = f(s_i)/K`` (the plain mean's step when every slot agrees, each kept slot at most 1/K);
a left-out slot gets no part of it. Every expected number is worked by hand in the docstrings.
"""

from __future__ import annotations

import numpy as np
import pytest

from aggregator import mda
from aggregator.config import StrategyConfig
from aggregator.strategies import Accepted, FedAvg, FedBuff, aggregate, reduce_choice
from fedline.config import ConfigError, parse

ROWS = ([1.0, 0.0], [1.2, 0.1], [-3.0, 5.0])


def test_distances_worked_by_hand():
    """(1, 0), (1.2, 0.1), (−3, 5): √(0.04 + 0.01) = 0.2236068, √(16 + 25) = 6.4031242,
    √(4.2² + 4.9²) = √(17.64 + 24.01) = 6.4536811."""
    d = mda.distances(np.array(ROWS))  # a float32 Gram matrix: six digits
    np.testing.assert_allclose(d[0, 1], 0.2236068, rtol=1e-5)
    np.testing.assert_allclose(d[0, 2], 6.4031242, rtol=1e-6)
    np.testing.assert_allclose(d[1, 2], 6.4536811, rtol=1e-6)
    np.testing.assert_allclose(d, d.T)
    assert (np.diag(d) == 0).all()


def test_the_far_slot_is_left_out_whole():
    """The three rows above, three sites enrolled: K = 2 kept of 3 received (f = 1), c = f(s)/K = 1/2 each. The pairs'
    diameters 0.224, 6.40, 6.45: S = {0, 1}; step = (1/2)(1, 0) + (1/2)(1.2, 0.1) = (1.1, 0.05)."""
    deltas = [{"w": np.array(r, np.float32)} for r in ROWS]
    step, keep = aggregate.mda_combination(deltas, [1 / 2] * 3)
    assert keep == (0, 1)
    np.testing.assert_allclose(step["w"], [1.1, 0.05], rtol=1e-6)


def test_staleness_scales_the_step_not_the_diameter():
    """Same rows, the second stale (c = f(s)/K = 0.6/2 = 0.3, as f(3) = 0.6 at K = 2): S is still {0, 1} (the
    diameter is taken between the deltas); step = 0.5 (1, 0) + 0.3 (1.2, 0.1) = (0.86, 0.03)."""
    deltas = [{"w": np.array(r, np.float32)} for r in ROWS]
    step, keep = aggregate.mda_combination(deltas, [1 / 2, 0.3, 1 / 2])
    assert keep == (0, 1)
    np.testing.assert_allclose(step["w"], [0.86, 0.03], rtol=1e-6)


def test_five_slots_one_left_out():
    """1-D rows 0, 1, 2, 10, 3, f = 1: leaving out 10 gives values {0, 1, 2, 3} of diameter 3; every subset with
    10 has a diameter of at least 8. Five received, K = 4 kept, c = 1/4 each: step = (0 + 1 + 2 + 3)/4 = 1.5."""
    deltas = [{"w": np.array([x], np.float32)} for x in (0.0, 1.0, 2.0, 10.0, 3.0)]
    step, keep = aggregate.mda_combination(deltas, [0.25] * 5)
    assert keep == (0, 1, 2, 4)
    np.testing.assert_allclose(step["w"], [1.5], rtol=1e-6)


def test_two_left_out_and_a_tie_keeps_the_first_in_index_order():
    """The same five rows, f = 2 (K = 3 kept of 5): subsets of three; indices {0, 1, 2} (values 0, 1, 2) and
    {1, 2, 4} (values 1, 2, 3) both have diameter 2, every other at least 3: the first in index order, {0, 1, 2};
    c = 1/3 each: step = (0 + 1 + 2)/3 = 1."""
    deltas = [{"w": np.array([x], np.float32)} for x in (0.0, 1.0, 2.0, 10.0, 3.0)]
    step, keep = aggregate.mda_combination(deltas, [1 / 3] * 5, f=2)
    assert keep == (0, 1, 2)
    np.testing.assert_allclose(step["w"], [1.0], rtol=1e-6)


@pytest.mark.parametrize(
    "f,k,n_sites,expected",
    [
        (1, 10, 4, (4, 3)),  # four enrolled: wait for all four, keep K = 3 (the attack suite's federation)
        (1, 10, 3, (3, 2)),  # three enrolled: wait for all three, keep 2
        (1, 10, 20, (11, 10)),  # enough sites: K + f = 11 received, K = 10 kept
        (1, 3, 20, (4, 3)),
        (2, 3, 20, (5, 3)),  # K + f = 5, keep 3
        (3, 3, 6, (5, 3)),  # f is at most K − 1 = 2: 5 received, 3 kept (a majority)
        (2, 10, 4, (4, 3)),  # four received: f lowered to (4 − 1) // 2 = 1
        (1, 10, 2, (2, 2)),  # two received: f lowered to 0, nothing left out
        (1, 1, 5, (1, 1)),  # K = 1 leaves nothing out (f at most K − 1 = 0)
    ],
)
def test_a_buffer_waits_for_k_plus_f_and_keeps_k(f, k, n_sites, expected):
    """(arrivals, kept) by hand from the rule: f' = min(f, k − 1); arrivals = min(k + f', n_sites); f'' =
    min(f', (arrivals − 1) // 2); kept = min(k, arrivals − f''), arrivals = kept + f''."""
    assert mda.sizes(f, k, n_sites) == expected


def test_equal_diameters_within_float32_rounding_are_a_tie():
    """Three equal rows: every pair's diameter is 0 up to rounding; the first pair, (0, 1), is kept."""
    rows = np.tile(np.linspace(-1.0, 1.0, 1000, dtype=np.float32), (3, 1))
    assert mda.subset(mda.distances(rows), 1) == (0, 1)


def test_f_is_lowered_so_that_a_majority_is_kept():
    """n = 3, f = 2 would keep one slot: f becomes (3 − 1) // 2 = 1. Rows 0, 1, 5: pair {0, 1}. Two slots: f = 0,
    both kept (neither is the outlier of two)."""
    assert mda.subset(mda.distances(np.array([[0.0], [1.0], [5.0]])), 2) == (0, 1)
    assert mda.subset(mda.distances(np.array([[0.0], [9.0]])), 1) == (0, 1)


@pytest.mark.parametrize(
    "table,k,n_sites,expected",
    [
        ({}, 4, 4, "mda"),  # K = min(10, 4): four received, three kept (= min_sites)
        ({"buffer_size": 3}, 3, 20, "mda"),  # four received of twenty, three kept
        # three enrolled, min_sites 3: leaving one out would sum two (each reads the other's delta): the mean
        ({"buffer_size": 3}, 3, 3, "mean"),
        ({"buffer_size": 3, "min_sites": 2}, 3, 3, "mda"),  # the operator accepts two per version
        ({"kind": "fedavg"}, 3, 3, "mean"),
        ({"kind": "fedavg"}, 4, 4, "mda"),
        ({"buffer_size": 2, "min_sites": 2}, 2, 2, "mean"),  # two slots: neither is the outlier
        ({"secure_aggregation": True}, 4, 4, "mean"),  # only masked sums: nothing to measure
        ({"robust": "median"}, 4, 4, "median"),  # the median stays an option
    ],
)
def test_mda_is_the_default_wherever_it_can_run(table, k, n_sites, expected):
    assert reduce_choice.resolve(parse(StrategyConfig, table, where="strategy"), k, n_sites) == expected


@pytest.mark.parametrize(
    "f,k,n_sites,min_kept,expected",
    [
        (1, 10, 3, 3, (3, 3)),  # three enrolled, min_sites 3: f lowered to 3 − 3 = 0, all three summed
        (1, 10, 4, 3, (4, 3)),  # four enrolled: one left out, three kept
        (2, 10, 5, 3, (5, 3)),  # five received, f = min(2, (5 − 1) // 2, 5 − 3) = 2
        (2, 10, 5, 4, (5, 4)),  # min_sites 4: f = min(2, 5 − 4) = 1
        (1, 3, 20, 3, (4, 3)),  # enough sites: K + f received, K kept, untouched
    ],
)
def test_a_version_never_sums_fewer_than_min_sites(f, k, n_sites, min_kept, expected):
    """By hand: f' = min(f, k − 1); arrivals = min(k + f', n); f'' = min(f', (arrivals − 1) // 2, arrivals −
    min_kept) (at least 0); kept = min(k, arrivals − f'')."""
    assert mda.sizes(f, k, n_sites, min_kept) == expected


def test_three_sites_sum_all_three_and_a_timed_out_buffer_keeps_min_sites():
    """The strategy at three enrolled sites (min_sites 3, the defaults otherwise): the mean, K = 3, three
    awaited. With robust = "mda" set explicitly and four enrolled, a buffer of three (closed by its timeout)
    keeps all three, not two: rows 0, 1 and 9 sum to 10 at 1/3 each."""
    from aggregator.strategies.fedbuff import FedBuff

    three = FedBuff(parse(StrategyConfig, {}, where="strategy"), n_sites=3)
    assert (three.reduce_stat, three.buffer_size, three.arrivals) == ("mean", 3, 3)
    four = FedBuff(parse(StrategyConfig, {"robust": "mda"}, where="strategy"), n_sites=4)
    assert (four.reduce_stat, four.buffer_size, four.arrivals) == ("mda", 3, 4)
    assert mda.kept_at_least(1, 3, 3) == 0
    assert mda.kept_at_least(1, 4, 3) == 1
    from aggregator.strategies.base import Accepted

    ups = [Accepted(s, 1, s, 0, 10, 0, 1.0, 0.0, {"w": np.array([v], np.float32)}) for s, v in zip("abc", (0, 1, 9))]
    step = four.combine([u.delta for u in ups], ups, {"w": np.zeros(1, np.float32)})
    assert step["w"][0] == pytest.approx(10 / 3)  # all three kept at f(s)/K = 1/3; MDA of old kept 0 and 1: 1/3
    assert [u.weight for u in ups] == pytest.approx([1 / 3] * 3)


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="mda_f must be at least 1"):
        parse(StrategyConfig, {"mda_f": 0}, where="strategy")
    # K = 40 kept of 40 + 5 = 45 received: C(45, 5) = 1,221,759 subsets
    with pytest.raises(ConfigError, match=r"45 slots received and C\(45, 5\) = 1221759 subsets"):
        parse(StrategyConfig, {"robust": "mda", "mda_f": 5, "buffer_size": 40}, where="strategy")
    with pytest.raises(ConfigError, match="unknown key"):  # the K + f rule replaced mda_scale (1 Dec 2026)
        parse(StrategyConfig, {"mda_scale": "k"}, where="strategy")


def up(site: str, value: float, factor: float = 1.0, n: int = 10) -> Accepted:
    return Accepted(site, 1, site, 0, n, 0, factor, 0.0, {"w": np.array([value], np.float32)})


def test_four_sites_four_received_three_kept_each_at_one_third():
    """Defaults (buffer_size 10), four enrolled, no norm bound: K = 3 summed of 4 received (f = 1), so a slot's
    coefficient is f(s)/K = 1/3. 1-D rows 0, 1, 2, 10: S = {0, 1, 2} (diameter 2; any subset with 10 at least 8);
    step = (0 + 1 + 2)/3 = 1.0, the mean of the kept (the step is not shortened); weights 1/3, 1/3, 1/3, 0, none
    above 1/K. The second stale, f = 0.6: c = 0.2; step = 0 + 0.2 · 1 + (1/3) · 2 = 0.8666667."""
    fb = FedBuff(StrategyConfig(norm_bound=0, clip_to_median=False), 4)
    assert (fb.reduce_stat, fb.buffer_size, fb.arrivals, fb.left_out) == ("mda", 3, 4, 1)
    assert fb.weight(10, 0) == pytest.approx(1 / 3)  # what a buffered receipt says
    ups = [up(s, v) for s, v in zip("abcm", (0.0, 1.0, 2.0, 10.0))]
    r = fb.reduce({"w": np.zeros(1, np.float32)}, ups, None)
    np.testing.assert_allclose(r.model["w"], [1.0], rtol=1e-6)
    assert [u.lineage()["weight"] for u in ups] == [pytest.approx(1 / 3)] * 3 + [0.0]
    ups[1] = up("b", 1.0, factor=0.6)
    r = fb.reduce({"w": np.zeros(1, np.float32)}, ups, None)
    np.testing.assert_allclose(r.model["w"], [0.8666667], rtol=1e-6)
    assert [u.weight for u in ups] == [pytest.approx(1 / 3), pytest.approx(0.2), pytest.approx(1 / 3), 0.0]


def test_a_buffer_closed_early_keeps_n_minus_f_at_f_over_k():
    """K = 3 (four enrolled) but only three arrive before the timeout: rows 0, 1, 10. With ``min_sites = 2``:
    3 ≥ 2f + 1, so 10 is left out and {0, 1} kept at 1/3 each: step = (0 + 1)/3 = 0.3333333, (n − f)/K = 2/3 of
    what two agreeing full slots' mean would move (as a FedBuff buffer closed early moves n/K as far). With the
    default ``min_sites = 3`` leaving one out would sum two sites: all three are kept, (0 + 1 + 10)/3 = 3.6666667."""
    fb = FedBuff(StrategyConfig(norm_bound=0, clip_to_median=False, min_sites=2), 4)
    ups = [up(s, v) for s, v in zip("abm", (0.0, 1.0, 10.0))]
    r = fb.reduce({"w": np.zeros(1, np.float32)}, ups, None)
    np.testing.assert_allclose(r.model["w"], [1 / 3], rtol=1e-6)
    assert [u.weight for u in ups] == [pytest.approx(1 / 3), pytest.approx(1 / 3), 0.0]
    fb3 = FedBuff(StrategyConfig(norm_bound=0, clip_to_median=False), 4)
    ups = [up(s, v) for s, v in zip("abm", (0.0, 1.0, 10.0))]
    np.testing.assert_allclose(fb3.reduce({"w": np.zeros(1, np.float32)}, ups, None).model["w"], [11 / 3], rtol=1e-6)
    assert [u.weight for u in ups] == [pytest.approx(1 / 3)] * 3


def test_fedavg_and_sample_weighting_weigh_the_kept_slots_only():
    """FedAvg, four enrolled: the round is all four, K = 3 kept. Rows 0, 1, 2, 10: the mean of the kept,
    (0 + 1 + 2)/3 = 1.0. A round closed at its deadline with 0, 1, 10: all three kept under min_sites 3 (11/3);
    with min_sites 2 the mean of the two kept, 0.5.
    FedBuff with sample weighting (robust = "mda" set), cap 1000, claims 100, 300, 100, 10⁷ on rows 0, 1, 2, 10:
    10 is left out; p over the kept = 100/500, 300/500, 100/500 = 0.2, 0.6, 0.2: step = 0.6 · 1 + 0.2 · 2 = 1.0;
    the claimed 10⁷ weighs nothing."""
    fa = FedAvg(StrategyConfig(kind="fedavg", norm_bound=0, clip_to_median=False), 4)
    assert (fa.reduce_stat, fa.buffer_size, fa.arrivals) == ("mda", 3, 4)
    ups = [up(s, v) for s, v in zip("abcm", (0.0, 1.0, 2.0, 10.0))]
    np.testing.assert_allclose(fa.reduce({"w": np.zeros(1, np.float32)}, ups, None).model["w"], [1.0], rtol=1e-6)
    three = [up(s, v) for s, v in zip("abm", (0.0, 1.0, 10.0))]
    # closed at its deadline with three: min_sites 3 keeps all three, (0 + 1 + 10)/3; min_sites 2 leaves 10 out
    np.testing.assert_allclose(fa.reduce({"w": np.zeros(1, np.float32)}, three, None).model["w"], [11 / 3], rtol=1e-6)
    fa2 = FedAvg(StrategyConfig(kind="fedavg", norm_bound=0, clip_to_median=False, min_sites=2), 4)
    np.testing.assert_allclose(fa2.reduce({"w": np.zeros(1, np.float32)}, three, None).model["w"], [0.5], rtol=1e-6)
    cfg = StrategyConfig(robust="mda", sample_weighting=True, sample_cap=1000.0, norm_bound=0, clip_to_median=False)
    fb = FedBuff(cfg, 4)
    ups = [up(s, v, n=n) for s, v, n in zip("abcm", (0.0, 1.0, 2.0, 10.0), (100, 300, 100, 10_000_000))]
    np.testing.assert_allclose(fb.reduce({"w": np.zeros(1, np.float32)}, ups, None).model["w"], [1.0], rtol=1e-6)
    assert [u.weight for u in ups] == [pytest.approx(0.2), pytest.approx(0.6), pytest.approx(0.2), 0.0]


def test_the_mean_and_secure_aggregation_wait_for_k():
    """No MDA, no wait for more: the mean (robust = "none") and secure aggregation (auto resolves to the mean)
    keep K = min(buffer_size, enrolled) and wait for K."""
    for table in ({"robust": "none"}, {"secure_aggregation": True}):
        fb = FedBuff(parse(StrategyConfig, table, where="strategy"), 4)
        assert (fb.reduce_stat, fb.buffer_size, fb.arrivals, fb.left_out) == ("mean", 4, 4, 0)


def test_mda_rows_lay_the_first_layer_out_by_column_and_are_centred():
    """The matrix MDA measures: the first layer's weights transposed (its input columns one after the other), then
    the other tensors in order, less the rows' mean (worked here from the deltas in float64); the whole vector's
    distances (the columns' Gram matrices plus the rest's) are the deltas' own, against a direct float64
    computation."""
    from aggregator.strategies import aggregate

    rng = np.random.default_rng(5)
    deltas = [
        {"b0": rng.normal(size=5).astype(np.float32), "a": rng.normal(size=(3, 4)).astype(np.float32) + 2.0}
        for _ in range(5)
    ]
    laid = np.stack([np.concatenate([d["a"].T.reshape(-1), d["b0"]]) for d in deltas]).astype(np.float64)
    rows = aggregate._rows(deltas, "a")
    assert rows.shape == (5, 17)
    np.testing.assert_allclose(rows, laid - laid.mean(axis=0), atol=1e-6)
    columns = aggregate._columns(rows, (3, 4))
    assert columns.shape == (4, 5, 3) and np.array_equal(columns[2, 1], rows[1, 6:9])
    flat = np.stack([np.concatenate([d["b0"], d["a"].reshape(-1)]) for d in deltas]).astype(np.float64)
    direct = np.sqrt(((flat[:, None] - flat[None]) ** 2).sum(axis=-1))
    whole = mda.gram(columns, 5).sum(axis=0, dtype=np.float64) + mda.gram(rows[:, 12:], 5)
    np.testing.assert_allclose(mda.from_gram(whole), direct, rtol=1e-5, atol=1e-6)
    assert aggregate.mda_keep(deltas, 1) == mda.subset(direct, 1)


def test_mda_rows_of_slots_n_mod_4_eq_3_end_in_a_zero_row():
    """Seven deltas: an eighth row of zeros (mda.padded), not a slot: the distances are the seven deltas' own,
    against a direct float64 pairwise computation, and the subset never names slot 7."""
    from aggregator.strategies import aggregate

    rng = np.random.default_rng(8)
    deltas = [{"a": rng.normal(size=(30, 4)).astype(np.float32) + 3.0} for _ in range(7)]
    deltas[6]["a"] += 0.5  # the far one
    rows = aggregate._rows(deltas)
    assert rows.shape == (8, 120) and not rows[7].any()
    direct = np.array([[np.linalg.norm(a["a"].astype(np.float64) - b["a"]) for b in deltas] for a in deltas])
    dist = mda.centred_distances(rows, 7)
    assert dist.shape == (7, 7)
    np.testing.assert_allclose(dist, direct, rtol=1e-5, atol=1e-6)
    assert aggregate.mda_keep(deltas, 1) == (0, 1, 2, 3, 4, 5)


def _subset_by_pair_loop(dist: np.ndarray, f: int) -> tuple[int, ...]:
    """The subset search written from its definition (every pair i < j of every n − f subset, in Python), as
    mda.subset computed it before its diameters became one NumPy call each: the reference it must match."""
    import itertools

    n = dist.shape[0]
    f = mda.left_out(f, n)
    best: tuple[int, ...] = tuple(range(n))
    best_d = np.inf
    for combo in itertools.combinations(range(n), n - f):
        d = max((dist[i, j] for i, j in itertools.combinations(combo, 2)), default=0.0)
        if not best_d < np.inf or d < best_d * (1.0 - mda.TIE):
            best, best_d = combo, d
    return best


@pytest.mark.parametrize("seed", range(12))
def test_subset_and_diameter_match_the_pair_loop(seed):
    """On random buffers (3 to 14 slots, f of 1 to 3, a far slot in some, duplicated slots for ties in others, and a
    distance matrix made slightly asymmetric so that only the upper triangle i < j may be read), the subset and every
    diameter are exactly those of the pair loop over i < j."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 15)) if seed < 8 else int(rng.integers(30, 60))  # f = 1 has its own path
    rows = rng.normal(size=(n, 6)).astype(np.float32)
    if seed % 3 == 0:
        rows[rng.integers(n)] += 40.0  # one far slot
    if seed % 3 == 1:
        rows[n - 1] = rows[0]  # a tie
        rows[n - 2] = rows[1]  # and the farthest pair's distance twice
    dist = mda.distances(rows)
    dist = dist + np.tril(rng.uniform(0.0, 1e-3, size=(n, n)), -1)  # lower triangle off: must not be read
    for f in (1, 2, 3) if n < 15 else (1, 2):
        assert mda.subset(dist, f) == _subset_by_pair_loop(dist, f)
    for k in range(n + 1):
        idx = tuple(sorted(rng.choice(n, size=k, replace=False).tolist()))
        expected = max((dist[i, j] for i in idx for j in idx if i < j), default=0.0)
        assert mda.diameter(dist, idx) == expected


def test_mda_rows_of_clipped_or_int8_deltas_are_centred_alike():
    """The first layer's block of a plain float32 delta is copied transposed as it is; a clipped one (here with
    scale 1: the same values) goes through ``_fill`` and a scratch row: the same rows bit for bit."""
    from aggregator.scaled_sum import Scaled
    from aggregator.strategies import aggregate

    rng = np.random.default_rng(9)
    deltas = [{"w": rng.normal(size=(6, 4)).astype(np.float32), "b": rng.normal(size=6).astype(np.float32)}]
    deltas += [{k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in deltas[0].items()} for _ in range(6)]
    plain = aggregate._rows(deltas, "w")
    assert plain.shape == (8, 30) and not plain[7].any()
    assert np.array_equal(aggregate._rows([Scaled(d, 1.0) for d in deltas], "w"), plain)
    assert np.array_equal(aggregate._rows(deltas[:3] + [Scaled(d, 1.0) for d in deltas[3:]], "w"), plain)
