"""The demo's DP defaults leave every site budget for every version the demo makes, at one sampling rate.

Why: the sixteenth tuning pass (docs/tuning.md) raised the batch share to 10 % with σ 1.5 and lr 0.2. A site
whose ledger runs out before the last version sits out (its edge refuses the round), so a default that spends ε
faster than the demo makes versions would quietly shrink the federation the report describes; and the ε of a
round depends on the sampling rate, so every site is meant to sample at the same q."""

from __future__ import annotations

import pytest

from edge.config import PrivacyConfig, TrainingConfig
from edge.privacy import PrivacyBudget
from edge.trainer import plan_round
from fedline.demo.data import load_demo_data
from fedline.demo.runner import DemoOptions, _load_kwargs, site_tuning

CMAPSS = DemoOptions(
    csv="data/cmapss_fd001.csv",
    site_column="plant",
    label="RUL",
    task="regression",
    group_column="unit",
    features="s2,s3,s4,s7,s8,s9,s11,s12,s13,s14,s15,s17,s20,s21".split(","),
)


def _plans(opts: DemoOptions):
    data = load_demo_data(**_load_kwargs(opts))
    tunings = site_tuning(data, opts)
    for s in data.sites:
        t = tunings[s.site]
        rows = int((~data.validation_mask(s)).sum())  # what the edge trains on
        yield s.site, t, plan_round(rows, TrainingConfig(epochs=t.epochs, batch_size=t.batch_size))


@pytest.mark.parametrize("opts", [DemoOptions(), CMAPSS], ids=["ai4i", "cmapss"])
def test_each_site_samples_at_one_rate_and_affords_more_rounds_than_versions(opts: DemoOptions) -> None:
    rates = set()
    for site, t, plan in _plans(opts):
        rates.add(round(plan.sample_rate, 6))
        budget = PrivacyBudget(PrivacyConfig(epsilon=t.epsilon, delta=t.delta, noise_multiplier=t.noise_multiplier))
        # a site trains about one round per version (FedBuff K = 3 of 4 sites); two spare rounds for the fallback
        # timer's and the cut-off site's extra rounds in a live run
        for r in range(t.versions + 2):
            after = budget.epsilon_after(plan.sample_rate, plan.steps)  # what the edge's allows() compares
            assert after <= t.epsilon, f"{site} out of budget at round {r + 1}: ε {after:.2f}"
            budget.commit(budget.state_after(plan.sample_rate, plan.steps), after)
        assert budget.epsilon <= t.epsilon
        assert t.versions + 2 <= 17  # the check above is not vacuous: the demo's versions are what it covers
    # q = 1 / ceil(n / round(0.1 n)): 1/10, or 1/11 where rounding the batch down leaves a few rows over
    assert rates <= {0.1, round(1 / 11, 6)}, rates
