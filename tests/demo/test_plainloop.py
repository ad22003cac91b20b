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


def test_each_round_is_the_aggregators_fedavg_reduce_worked_by_hand(monkeypatch):
    """The floor's step is the aggregator's FedAvg (McMahan: Σ n_i/Σn Δ_i), with the aggregator's clipping of
    each delta to the round's median norm. Fixed deltas, one per site, so the step can be worked by hand."""
    import numpy as np

    import fedline.demo.plainloop as plainloop
    from models import build_model, shared_state

    _, spec, tcfg = _setup()
    data = load_demo_data()  # the sites' own sizes, so the weights n_i / Σn differ
    sites = [s.site for s in data.sites]
    rows = {s.site: len(s.x_train) for s in data.sites}
    glob0 = shared_state(build_model(spec, seed=0), spec)
    names = sorted(glob0)
    first = names[0]
    norms = {site: float(i + 1) for i, site in enumerate(sites)}  # 1, 2, 3, ...: the median is the middle one

    class R:
        def __init__(self, delta, personal):
            self.delta, self.personal = delta, personal

    def fake_round(spec_, glob, personal, x, y, tcfg_, privacy, budget):
        site = sites[len(seen)]  # the loop runs the sites in their order
        assert len(x) == rows[site]
        seen.add(site)
        d = {k: np.zeros_like(v) for k, v in glob.items()}
        d[first].flat[sites.index(site)] = norms[site]  # one coordinate each: orthogonal, norm = norms[site]
        return R(d, personal)

    assert len(set(rows.values())) == len(rows) >= 3
    seen: set[str] = set()
    monkeypatch.setattr(plainloop, "dp_round", fake_round)
    r = plainloop.fedavg(data, spec, 1, tcfg, None, evaluate_each_round=False)

    median = sorted(norms.values())[len(norms) // 2] if len(norms) % 2 else float(np.median(list(norms.values())))
    total = sum(rows.values())
    expected = glob0[first].copy()
    for site in sites:
        clipped = min(norms[site], median)  # clip_to_median: no delta counts for more than a typical one
        expected.flat[sites.index(site)] += rows[site] / total * clipped
    np.testing.assert_allclose(r.params[first], expected, rtol=1e-6, atol=1e-7)
    for k in names[1:]:
        np.testing.assert_array_equal(r.params[k], glob0[k])
