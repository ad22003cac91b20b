"""Centered clipping (aggregator/cclip.py; Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust
Optimization", ICML 2021) as ``robust = "cclip"``.

The rule (their eq. (CC)): ``v_{l+1} = v_l + (1/n) Σ_i (x_i − v_l) min(1, τ/‖x_i − v_l‖)`` from ``v_0`` the previous
aggregate; fedline's τ is ``cclip_tau`` times the median distance ``‖x_i − v_0‖`` and ``v_0`` the previous version's
step. Every expected number is worked by hand in the docstrings (square roots to seven digits).
"""

from __future__ import annotations

import numpy as np
import pytest

from aggregator import cclip
from aggregator.config import StrategyConfig
from aggregator.strategies import Accepted, FedBuff, aggregate
from fedline.config import ConfigError, parse

ROWS = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
ORIGIN = np.zeros(2)


def test_one_iteration_worked_by_hand():
    """Centre (0, 0); distances 5, 1, 2; τ = 2 (their median): s = (2/5, 1, 1) = (0.4, 1, 1).
    v_1 = (1/3)(0.4 · (3, 4) + (1, 0) + (0, 2)) = (1/3)(2.2, 3.6) = (0.7333333, 1.2);
    b = s/3 = (0.1333333, 0.3333333, 0.3333333), a = 1 − (0.4 + 1 + 1)/3 = 0.2."""
    assert cclip.radius(ROWS, ORIGIN) == pytest.approx(2.0)
    np.testing.assert_allclose(cclip.clip_factors(ROWS, ORIGIN, 2.0), [0.4, 1.0, 1.0])
    v, b, a = cclip.iterate(ROWS, ORIGIN, 2.0)
    np.testing.assert_allclose(v, [0.7333333, 1.2], rtol=1e-6)
    np.testing.assert_allclose(b, [0.1333333, 0.3333333, 0.3333333], rtol=1e-6)
    assert a == pytest.approx(0.2)
    assert max(b) <= 1 / 3 + 1e-12  # L = 1: no row above 1/n


def test_two_iterations_worked_by_hand_and_a_row_may_weigh_more_than_one_nth():
    """From v_1 = (0.7333333, 1.2), τ = 2: x_1 − v_1 = (2.2666667, 2.8), ‖·‖ = √(5.1377778 + 7.84) = 3.6024683;
    x_2 − v_1 = (0.2666667, −1.2), √1.5111111 = 1.2292726; x_3 − v_1 = (−0.7333333, 0.8), √1.1777778 = 1.0852547.
    s = (2/3.6024683, 1, 1) = (0.5551749, 1, 1); 1 − S/3 = 1 − 2.5551749/3 = 0.1482750.
    v_2 = 0.1482750 · (0.7333333, 1.2) + (1/3)(0.5551749 · (3, 4) + (1, 0) + (0, 2))
        = (0.1087350, 0.1779300) + (0.8885083, 1.4068999) = (0.9972433, 1.5848299).
    b_2 = 0.1482750 · b_1 + s/3 = (0.0197700 + 0.1850583, 0.0494250 + 0.3333333, same) = (0.2048283, 0.3827583,
    0.3827583): above 1/3, so with L > 1 a slot can weigh more than its fair share; a = 0.1482750 · 0.2 = 0.0296550."""
    v, b, a = cclip.iterate(ROWS, ORIGIN, 2.0, iters=2)
    np.testing.assert_allclose(v, [0.9972433, 1.5848299], rtol=1e-6)
    np.testing.assert_allclose(b, [0.2048283, 0.3827583, 0.3827583], rtol=1e-6)
    assert a == pytest.approx(0.0296550, rel=1e-5)
    np.testing.assert_allclose(v, a * ORIGIN + b @ ROWS, rtol=1e-12)  # affine in the rows, as iterate() says


def test_a_row_at_the_centre_and_a_zero_radius():
    """A row at the centre enters whole (s = 1); τ = 0 keeps the centre (every other row s = 0)."""
    np.testing.assert_allclose(cclip.clip_factors(np.array([[0.0, 0.0], [3.0, 4.0]]), ORIGIN, 0.0), [1.0, 0.0])
    with pytest.raises(ValueError, match="at least one iteration"):
        cclip.iterate(ROWS, ORIGIN, 1.0, iters=0)


def up(site: str, value: float, factor: float = 1.0) -> Accepted:
    return Accepted(site, 1, site, 0, 10, 0, factor, 0.0, {"w": np.array([value], np.float32)})


def test_fedbuff_four_sites_two_versions_centre_carried():
    """robust = "cclip", four enrolled, no norm bound: K = 4 (no slot left out), c = 1/4, rows x_i = 4 · (1/4) Δ_i.
    Version 1, centre 0: deltas 0, 1, 2, 10, distances 0, 1, 2, 10, τ = median = 1.5; s = (1, 1, 0.75, 0.15);
    step = (1/4)(0 + 1 + 0.75 · 2 + 0.15 · 10) = (1/4)(4) = 1.0; weights c s = 0.25, 0.25, 0.1875, 0.0375 (the far
    slot at 0.0375 of a 1/4 share). Version 2, centre 1.0 (the step carried): deltas 1, 1.5, 0.5, −10, distances 0,
    0.5, 0.5, 11, τ = 0.5; s = (1, 1, 1, 0.5/11 = 0.0454545); step = 1 + (1/4)(0 + 0.5 − 0.5 + 0.0454545 · (−11))
    = 1 − 0.125 = 0.875; model 1.0 + 0.875 = 1.875."""
    fb = FedBuff(StrategyConfig(robust="cclip", norm_bound=0, clip_to_median=False), 4)
    assert (fb.reduce_stat, fb.buffer_size, fb.arrivals, fb.left_out) == ("cclip", 4, 4, 0)
    ups = [up(s, v) for s, v in zip("abcm", (0.0, 1.0, 2.0, 10.0))]
    r = fb.reduce({"w": np.zeros(1, np.float32)}, ups, None)
    np.testing.assert_allclose(r.model["w"], [1.0], rtol=1e-6)
    np.testing.assert_allclose(r.momentum["w"], [1.0], rtol=1e-6)  # the next version's centre
    np.testing.assert_allclose([u.weight for u in ups], [0.25, 0.25, 0.1875, 0.0375], rtol=1e-6)
    ups = [up(s, v) for s, v in zip("abcm", (1.0, 1.5, 0.5, -10.0))]
    r = fb.reduce(r.model, ups, r.momentum)
    np.testing.assert_allclose(r.model["w"], [1.875], rtol=1e-6)
    np.testing.assert_allclose(r.momentum["w"], [0.875], rtol=1e-6)
    assert max(u.weight for u in ups) <= 1 / 4 + 1e-9


def test_no_row_clipped_is_fedbuffs_mean_with_staleness():
    """cclip_tau = 100: nothing is clipped, so the step is FedBuff's (1/K) Σ f(s_i) Δ_i. Deltas 0, 1, 2, 10 with the
    second at f = 0.5: (0 + 0.5 + 2 + 10)/4 = 3.125; its weight f/K = 0.125."""
    fb = FedBuff(StrategyConfig(robust="cclip", cclip_tau=100.0, norm_bound=0, clip_to_median=False), 4)
    ups = [up("a", 0.0), up("b", 1.0, factor=0.5), up("c", 2.0), up("m", 10.0)]
    r = fb.reduce({"w": np.zeros(1, np.float32)}, ups, None)
    np.testing.assert_allclose(r.model["w"], [3.125], rtol=1e-6)
    np.testing.assert_allclose([u.weight for u in ups], [0.25, 0.125, 0.25, 0.25], rtol=1e-6)


def test_the_combination_over_states_matches_the_rows():
    """Two tensors flattened into one row each: the state function gives the row rule's numbers (ROWS split as
    w = first coordinate, b = second; c = 1/3, centre 0, τ = 2): step (0.7333333, 1.2)."""
    deltas = [{"w": np.array([r[0]], np.float32), "b": np.array([r[1]], np.float32)} for r in ROWS]
    step, weights = aggregate.cclip_combination(deltas, [1 / 3] * 3, None)
    np.testing.assert_allclose([step["w"][0], step["b"][0]], [0.7333333, 1.2], rtol=1e-6)
    np.testing.assert_allclose(weights, [0.1333333, 0.3333333, 0.3333333], rtol=1e-6)


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="server_momentum = 0"):
        parse(StrategyConfig, {"robust": "cclip", "server_momentum": 0.9}, where="strategy")
    with pytest.raises(ConfigError, match="cclip_tau must be positive"):
        parse(StrategyConfig, {"robust": "cclip", "cclip_tau": 0.0}, where="strategy")
    with pytest.raises(ConfigError, match="cclip_iters"):
        parse(StrategyConfig, {"robust": "cclip", "cclip_iters": 0}, where="strategy")


def test_the_centre_is_the_previous_step_and_survives_a_restart(tmp_path):
    """Through the aggregator core: after version 1 the kept centre is that version's step, (x_1 − x_0)/η_g
    (η_g = 0.8 here); a core restarted on the same state dir (no close: the process died) holds the same centre and
    finishes the stream to the same model, bit for bit, as an uninterrupted core."""
    from aggregator.core import AggregatorCore
    from tests.aggregator.helpers import make_federation, random_delta

    sites = ["site-a", "site-b", "site-c"]
    strategy = 'kind = "fedbuff"\nbuffer_size = 3\nrobust = "cclip"\nserver_lr = 0.8'
    fed = make_federation(tmp_path / "fed", sites)
    cfg = fed.config(strategy=strategy)
    core = AggregatorCore(cfg)
    x0 = {k: v.copy() for k, v in core.model.items()}
    rng = np.random.default_rng(7)
    blobs = []
    for i in range(9):  # three versions of three fresh updates (every update trained on the version before it)
        blob, _ = fed.seal(sites[i % 3], random_delta(x0, rng, 0.05), base_version=i // 3, n_samples=10)
        blobs.append(blob)
    for b in blobs[:4]:
        core.submit(b)
    assert (core.version, len(core.buffer)) == (1, 1)
    for k in x0:
        np.testing.assert_allclose(core.momentum[k], (core.model[k] - x0[k]) / 0.8, rtol=1e-4, atol=1e-7)
    again = AggregatorCore(cfg)
    for k in core.momentum:
        np.testing.assert_array_equal(again.momentum[k], core.momentum[k])
    for b in blobs[4:]:
        again.submit(b)
    ref = AggregatorCore(fed.config(strategy=strategy, state_dir=str(tmp_path / "ref-state"), name="ref.toml"))
    for b in blobs:
        ref.submit(b)
    assert again.version == ref.version == 3
    for k in ref.model:
        np.testing.assert_array_equal(again.model[k], ref.model[k])
    again.close()
    ref.close()
