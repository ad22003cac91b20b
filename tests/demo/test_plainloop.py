"""The plain loop's participation rules, which the split study relies on to mirror a demo run."""

from __future__ import annotations

from edge.config import PrivacyConfig, TrainingConfig
from fedline.demo.data import load_demo_data
from fedline.demo.plainloop import fedavg
from fedline.demo.workspace import Tuning, model_table
from models.spec import ModelSpec


def _setup():
    data = load_demo_data(max_rows_per_site=150)
    spec = ModelSpec.from_dict({**model_table(data, Tuning(hidden=(8,))), "personal": []})
    return data, spec, TrainingConfig(epochs=1, batch_size=16, lr=0.05, threads=1)


def test_an_absent_site_misses_its_rounds_and_spends_nothing():
    data, spec, tcfg = _setup()
    priv = PrivacyConfig(epsilon=50.0, noise_multiplier=1.0, max_grad_norm=1.0)
    r = fedavg(data, spec, 3, tcfg, priv, absent={"M": range(2)}, evaluate_each_round=False)
    assert r.transfers == 2 * (3 + 3 + 1)  # L and H every round, M only in the last
    assert 0 < r.epsilon["M"] < r.epsilon["L"] == r.epsilon["H"]


def test_a_site_whose_budget_is_spent_sits_out_and_the_loop_stops_when_all_have():
    data, spec, tcfg = _setup()
    one_round = fedavg(
        data,
        spec,
        1,
        tcfg,
        PrivacyConfig(epsilon=50.0, noise_multiplier=1.0, max_grad_norm=1.0),
        evaluate_each_round=False,
    ).epsilon["L"]
    budget = one_round * 1.05  # room for one round, not two (ε of two is well above)
    r = fedavg(data, spec, 5, tcfg, PrivacyConfig(epsilon=budget, noise_multiplier=1.0, max_grad_norm=1.0))
    assert r.transfers == 2 * 3 and len(r.metrics) == 1  # one round each, then nobody may train
    assert all(e <= budget for e in r.epsilon.values())
