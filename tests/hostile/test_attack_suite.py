"""Issue 14's attack suite: one malicious enrolled site against three honest AI4I sites, over a real Mosquitto.

The default test runs two attacks for three loops (the flood of K back-to-back updates and the
model-replacement backdoor claiming 10**7 samples); the full report (all four attacks, six loops) is
``@pytest.mark.slow`` and ``python -m tests.hostile.attack_suite`` prints it. What is checked, with the
aggregator's defaults: the malicious site holds at most one slot of each version, with coefficient at most
1/K, its delta clipped to the bound in force; and the global model stays much closer to the honest-only run
than before the fix (pre-fix numbers in RELIABILITY.md: relative distance 0.81 to 2,200).
"""

from __future__ import annotations

import math

import pytest

from tests.hostile import attack_suite as suite


def check_fair_share(rep: dict) -> None:
    for name, r in rep["attacks"].items():
        versions = [e["version"] for e in r["attacker_entries"]]
        assert len(versions) == len(set(versions)), f"{name}: the attacker held two slots of one version"
        for e in r["attacker_entries"]:
            assert e["weight"] <= 1 / suite.K + 1e-9, f"{name}: coefficient {e['weight']} above 1/K"
            assert e["clip_scale"] <= 1.0


async def test_attack_suite_fast(tmp_path):
    rep = await suite.report(tmp_path, loops=3, attacks=("flood", "replace"))
    check_fair_share(rep)
    assert rep["attacks"]["flood"]["attacker_entries"], "the attacker took part (else nothing was tested)"
    for name, r in rep["attacks"].items():
        # pre-fix the same attacks moved the model 0.82 (flood) and 6.8 (replace) x the honest run's movement
        assert r["relative_distance"] < 0.5, (name, r["relative_distance"])
        assert math.isfinite(r["distance"])


@pytest.mark.slow
async def test_attack_suite_full_report(tmp_path):
    rep = await suite.report(tmp_path / "defaults", loops=6)
    print("\n" + suite.table(rep))
    check_fair_share(rep)
    for name, r in rep["attacks"].items():
        assert r["relative_distance"] < 0.5, (name, r["relative_distance"])


@pytest.mark.slow
async def test_attack_suite_backdoor_with_the_median_reduce(tmp_path):
    """With robust = "median" the backdoor's success stays within 5 points of the clean (median) model's rate
    (RELIABILITY.md: 0.38 and 0.45 against 0.42); with the plain mean it does not (0.82 against 0.20)."""
    rep = await suite.report(tmp_path, loops=6, attacks=("samples", "replace"), extra='robust = "median"')
    print("\n" + suite.table(rep))
    check_fair_share(rep)
    for name, r in rep["attacks"].items():
        assert abs(r["backdoor_rate"] - rep["clean_backdoor_rate"]) <= 0.05 + 1e-9, (name, r["backdoor_rate"])
