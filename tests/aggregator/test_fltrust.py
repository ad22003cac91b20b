"""FLTrust (Cao et al., NDSS 2021, Alg. 2) as fedline's ``robust = "fltrust"``.

The paper's step: ``TS_i = ReLU(cos(g_i, g_0))``, ``ḡ_i = (‖g_0‖/‖g_i‖) g_i``, ``g = Σ TS_i ḡ_i / Σ TS_j``.
fedline keeps FedBuff's ``c_i = f(s_i)/K`` in front and caps each share ``TS_i/ΣTS`` at ``1/n``
(aggregator/strategies/aggregate.py). Every expected number is worked by hand in the docstrings.
"""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.config import DPConfig, StrategyConfig, parse_config
from aggregator.root_update import RootUpdate
from aggregator.strategies import Accepted, FedBuff, aggregate
from fedline.config import ConfigError

G0 = {"w": np.array([3.0, 4.0], np.float32)}  # ‖g_0‖ = 5
DELTAS = [
    {"w": np.array([6.0, 8.0], np.float32)},  # cos 1: TS 1, ḡ = (3, 4)
    {"w": np.array([0.0, 2.0], np.float32)},  # cos (0·3 + 2·4)/(2·5) = 0.8: TS 0.8, ḡ = (0, 5)
    {"w": np.array([-3.0, -4.0], np.float32)},  # cos -1: TS 0
]


def test_the_papers_step_worked_by_hand():
    """Σ TS = 1.8; g = (1·(3, 4) + 0.8·(0, 5)) / 1.8 = (3, 8)/1.8 = (1.6666667, 4.4444444)."""
    step, weights, trust = aggregate.fltrust_combination(DELTAS, [1 / 3] * 3, G0, fair_cap=False)
    np.testing.assert_allclose(trust, [1.0, 0.8, 0.0], atol=1e-7)
    np.testing.assert_allclose(step["w"], [3 / 1.8, 8 / 1.8], rtol=1e-6)
    np.testing.assert_allclose(weights, [1 / 1.8, 0.8 / 1.8, 0.0], rtol=1e-6)


def test_the_fair_cap_keeps_every_share_at_most_one_slot():
    """Shares 1/1.8 = 0.556 and 0.8/1.8 = 0.444 both capped at 1/3, the distrusted 0 stays 0:
    step = (1/3)(3, 4) + (1/3)(0, 5) = (1, 3)."""
    step, weights, _ = aggregate.fltrust_combination(DELTAS, [1 / 3] * 3, G0)
    np.testing.assert_allclose(step["w"], [1.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(weights, [1 / 3, 1 / 3, 0.0], rtol=1e-6)


def test_staleness_scales_each_normalised_update_and_never_cancels():
    """K = 2: (6, 8) fresh (f = 1, c = 1/2) and (0.3, 0.4) at f(s) = 1/2 (c = 1/4); both along g_0 (TS 1,
    shares 1/2), both rescaled to (3, 4): step = 2·(1/2·1/2 + 1/4·1/2)·(3, 4) = 0.75·(3, 4) = (2.25, 3).
    Alone in a buffer of K = 3 at f = 1/2: n = 1, c = 1/6, share 1: step = (1/6)(3, 4) = (0.5, 0.6667)."""
    pair = [{"w": np.array([6.0, 8.0], np.float32)}, {"w": np.array([0.3, 0.4], np.float32)}]
    step, _, _ = aggregate.fltrust_combination(pair, [0.5, 0.25], G0)
    np.testing.assert_allclose(step["w"], [2.25, 3.0], rtol=1e-6)
    step, _, _ = aggregate.fltrust_combination(pair[1:], [0.5 / 3], G0)
    np.testing.assert_allclose(step["w"], [0.5, 2 / 3], rtol=1e-6)


def test_no_trusted_update_gives_no_step():
    step, weights, trust = aggregate.fltrust_combination(DELTAS[2:], [1.0], G0)
    assert trust == [0.0] and weights == [0.0]
    np.testing.assert_array_equal(step["w"], [0.0, 0.0])


def test_fedbuff_with_fltrust_steps_records_trust_and_slots():
    """Through FedBuff (K = 3, η_g = 1, clip_to_median off): x = (1, 1) + (1, 3) = (2, 4); weights and trust
    as above, in each update's lineage."""
    strat = FedBuff(StrategyConfig(robust="fltrust", buffer_size=3, clip_to_median=False), 3)
    assert strat.reduce_stat == "fltrust"
    seen = []
    strat.reference = lambda model: seen.append(model["w"].tolist()) or G0
    ups = [Accepted(s, 1, "m", 0, 10, 0, 1.0, 0.0, d) for s, d in zip("abc", DELTAS)]
    out = strat.reduce({"w": np.ones(2, np.float32)}, ups, None).model
    np.testing.assert_allclose(out["w"], [2.0, 4.0], rtol=1e-6)
    assert seen == [[1.0, 1.0]]  # g_0 trained from the current global model
    assert [u.lineage()["trust"] for u in ups] == pytest.approx([1.0, 0.8, 0.0])
    assert [u.weight for u in ups] == pytest.approx([1 / 3, 1 / 3, 0.0])


def test_without_a_reference_fltrust_refuses_to_reduce():
    strat = FedBuff(StrategyConfig(robust="fltrust", buffer_size=3), 3)
    with pytest.raises(RuntimeError, match="root rows"):
        strat.reduce({"w": np.ones(2, np.float32)}, [Accepted("a", 1, "m", 0, 1, 0, 1.0, 0.0, G0)] * 3, None)


def test_fltrust_without_evaluation_rows_is_a_config_error():
    table = {
        "aggregator": {"federation": "f", "key_file": "k", "enrollment_file": "e", "state_dir": "s"},
        "model": {"kind": "mlp", "n_features": 2, "hidden": [4], "task": "classification"},
        "strategy": {"robust": "fltrust", "buffer_size": 3},
    }
    with pytest.raises(ConfigError, match=r'robust = "fltrust" needs an \[evaluation\] table'):
        parse_config(table).validate()


def test_the_root_update_descends_the_root_loss_and_is_repeatable():
    """g_0 from the same model is the same (seeded by model and seed), and lowers the root rows' loss."""
    import torch

    from models import ModelSpec, build_model, load_shared_state, loss_per_sample, shared_state

    spec = ModelSpec(kind="mlp", n_features=2, hidden=[4], task="classification")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 2)).astype(np.float32)
    y = (x[:, :1] > 0).astype(np.float32)
    w = shared_state(build_model(spec, seed=1), spec)
    root = RootUpdate(spec, x, y, DPConfig(lr=0.5, batch_size=16, steps=20), seed=3)
    g0 = root(w)
    assert all(np.array_equal(g0[k], root(w)[k]) for k in g0)

    def loss(state):
        m = build_model(spec, seed=1)
        load_shared_state(m, spec, state)
        with torch.no_grad():
            return float(loss_per_sample(m, spec, torch.from_numpy(x), torch.from_numpy(y)).mean())

    assert loss({k: w[k] + g0[k] for k in w}) < loss(w) - 0.05
