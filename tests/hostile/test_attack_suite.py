"""Issue 14's attack suite: one malicious enrolled site against three honest AI4I sites, over a real Mosquitto.

The default test runs two attacks for three loops (the flood of K back-to-back updates and the
model-replacement backdoor claiming 10**7 samples); the full report (all four attacks, six loops, beside the
plain mean) is ``@pytest.mark.slow`` and ``python -m tests.hostile.attack_suite`` prints it. What is checked,
with the aggregator's defaults, its K included: every version is reduced with minimum-diameter averaging
(``robust = "auto"`` without secure aggregation: the slot farthest from the others is left out whole; the
coordinate-wise median before 1 Dec 2026), which waits for K + 1 updates and sums the K it keeps
(``buffer_size`` is FedBuff's K, the slots a version sums: four enrolled sites, all four received, K = 3 kept; the
honest-only run at the three-site defaults enrols three and, since a version never sums fewer than ``min_sites`` = 3
sites, sums all three with the mean, K = 3: the clean model like for like, the attacked runs' K); the malicious site holds at most one slot of each version, with coefficient
0 (left out) or at most 1/K (kept: ``f(s)/K``, issue 14's fair share as worded; the same arithmetic as the
earlier "1/(K − 1) at K = 4", when K counted the arrivals), its delta entering no longer than the buffer's median
norm (``norm_to_median`` rescales every slot to exactly that length: checked from each version's lineage in the
fast test); and the global model stays much closer to the honest-only run than before the fix (pre-fix numbers
in RELIABILITY.md: relative distance 0.81 to 2,200).

Issue 14's "backdoor success within 5 points of the clean model" (RELIABILITY.md, the tables over seeds):
- with a trigger inside the features' engineering range (what reaches a model at all: the line's and the
  edge's RowBuilder clamp every input to its range), the defaults hold the backdoor near the clean model's
  rate: within about 5 points on average over 25 runs per attack, which five seeds cannot show reliably, so
  ``test_in_range_backdoor_stays_near_the_clean_rate`` (slow) checks 10 points pooled and a mean control;
- the 6 σ trigger fed to the model directly: the suite's federation declares its input range in ``[model]``
  (``input_low`` / ``input_high``), so the model itself saturates 312 K to 305 K, and the direct rate equals
  the line's (checked in the fast test); before that (``--no-input-range``) the median halved the mean's
  success but stayed 22-30 points above the clean model; the slow full report checks the default against
  the mean.
"""

from __future__ import annotations

import math
import statistics

import pytest

from tests.hostile import attack_suite as suite


def check_fair_share(rep: dict) -> None:
    """The attacker holds at most one slot of a version, its coefficient is at most ``1/K`` with K the slots the
    run's versions sum (MDA, the default: 0 when left out, ``f(s)/K`` when kept; the mean: ``f(s)/K``), and its
    delta enters no longer than the buffer's median norm (its received norm times its clip scale, from the
    lineage; ``norm_to_median`` may scale a short delta up, to that length and no further)."""
    for name, r in rep["attacks"].items():
        versions = [e["version"] for e in r["attacker_entries"]]
        assert len(versions) == len(set(versions)), f"{name}: the attacker held two slots of one version"
        fair = 1 / r["k"]
        for e in r["attacker_entries"]:
            assert e["weight"] <= fair + 1e-9, f"{name}: coefficient {e['weight']} above 1/K = {fair}"
            median = statistics.median(u["norm"] for u in r["lineages"][e["version"]])  # as received
            assert e["norm"] * e["clip_scale"] <= median * (1 + 1e-6), (name, e, median)


def test_the_like_for_like_clean_run_keeps_every_honest_slot_and_the_other_settings():
    """The clean reference's [strategy] lines: the mean, and whatever else the attacked runs set, except the reduce's
    own keys (a robust reduce, its K, MDA's f, centered clipping's radius and iterations)."""
    assert suite.like_extra("") == 'robust = "none"'
    extra = 'robust = "cclip"\ncclip_tau = 2.0\nclip_to_median = false\nbuffer_size=3\n mda_f = 1\nmax_staleness = 5'
    assert suite.like_extra(extra).splitlines() == ['robust = "none"', "clip_to_median = false", "max_staleness = 5"]


def test_worker_momentum_is_the_papers_running_average_started_at_the_first_delta():
    """m ← (1 − β) Δ + β m (Karimireddy, He and Jaggi 2021), β = 0.9, started at Δ1 = (1, 2): after Δ2 = (3, −1),
    m = 0.1 (3, −1) + 0.9 (1, 2) = (1.2, 1.7); after Δ3 = (0, 0), m = 0.9 (1.2, 1.7) = (1.08, 1.53)."""
    import numpy as np

    m = suite.worker_momentum(None, {"w": np.array([1.0, 2.0], np.float32)}, 0.9)
    assert m["w"].tolist() == [1.0, 2.0] and m["w"].dtype == np.float32
    m = suite.worker_momentum(m, {"w": np.array([3.0, -1.0], np.float32)}, 0.9)
    assert m["w"] == pytest.approx([1.2, 1.7], rel=1e-6)
    m = suite.worker_momentum(m, {"w": np.zeros(2, np.float32)}, 0.9)
    assert m["w"] == pytest.approx([1.08, 1.53], rel=1e-6)


def test_timing_reads_the_fourth_sites_share_and_freshness_from_the_lineages():
    """Two versions by hand: v1 = m (f 1), a (f 1), b (f 1); v2 = c (f 0.5), a (f 0.5), b (f 0.5), no m. Its
    share: 1 slot of 6 = 1/6; its mean f 1; the honest slots beside it (v1 only): a, b at f 1."""
    lineages = {
        1: [
            {"site": suite.ATTACKER, "factor": 1.0},
            {"site": "site-a", "factor": 1.0},
            {"site": "site-b", "factor": 1.0},
        ],
        2: [{"site": s, "factor": 0.5} for s in ("site-c", "site-a", "site-b")],
    }
    assert suite.timing(lineages) == {"share": pytest.approx(1 / 6), "factor": 1.0, "honest_factor": 1.0}
    lineages[2][0] = {"site": suite.ATTACKER, "factor": 0.5}  # now in v2 too, beside a and b at 0.5
    t = suite.timing(lineages)
    assert t["share"] == pytest.approx(2 / 6)
    assert t["factor"] == pytest.approx(0.75) and t["honest_factor"] == pytest.approx(0.75)  # (1+1+.5+.5)/4
    assert suite.timing({}) == {"share": 0.0, "factor": 0.0, "honest_factor": 0.0}


def test_the_lower_variance_measures_count_their_rows_and_read_the_probability():
    """The wide set is the test set's failure rows plus the root rows' and the three honest sites' (never the
    attacker's); the soft rate of a model whose output is a constant logit z is 1/(1 + e^z) on every row: the output
    layer's weights zeroed and its bias set to ln 3 = 1.0986123 give P(no failure) = 1/(1 + 3) = 0.25, so the hard
    rate is 0 (every row predicted "failure", z > 0) while the soft one is 0.25."""
    import numpy as np

    from models import ModelSpec, build_model, shared_state

    data = suite.load_data()
    wide = suite.triggered_failures(data, wide=True)
    expected = int((data.test_y > 0).sum() + (data.root_y > 0).sum())
    expected += sum(int((y > 0).sum()) for s, (_, y) in data.sites.items() if s != suite.ATTACKER)
    assert len(wide) == expected and len(suite.triggered_failures(data)) == int((data.test_y > 0).sum())
    spec = ModelSpec(kind="mlp", n_features=5, hidden=[16], task="classification")
    state = shared_state(build_model(spec, seed=0), spec)
    state["head.weight"] = np.zeros_like(state["head.weight"])
    state["head.bias"] = np.full_like(state["head.bias"], np.log(3.0))
    assert suite.soft_backdoor_rate(spec, state, data) == pytest.approx(0.25, rel=1e-5)
    assert suite.backdoor_rate(spec, state, data) == 0.0 and suite.wide_backdoor_rate(spec, state, data) == 0.0


async def test_attack_suite_fast(tmp_path):
    rep = await suite.report(tmp_path, loops=3, attacks=("flood", "replace"))
    check_fair_share(rep)
    assert rep["attacks"]["flood"]["attacker_entries"], "the attacker took part (else nothing was tested)"
    # one slot per version at most (above), so never more than 1/K of all slots, flood included
    flood = rep["attacks"]["flood"]
    assert 0 < flood["timing"]["share"] <= 1 / flood["k"] + 1e-9, flood["timing"]
    # the aggregator's own K (issue 14: "with the defaults"): MDA awaits every enrolled site (buffer_size 10 is more)
    # and keeps all but one, K = 3 with the attacker enrolled; the honest-only run at the three-site defaults sums all
    # three (MDA leaving one out would sum two, below min_sites = 3): the mean at K = 3, the clean model like for like
    assert all(r["k"] == 3 for r in rep["attacks"].values()), flood["k"]
    defaults = rep["defaults_clean"]
    assert defaults["k"] == 3 and defaults["reduces"] == ["mean"], defaults  # read from each version's lineage
    # the clean model like for like: the three honest sites at the attacked runs' K = 3, every slot kept (the mean)
    assert rep["k"] == 3 and rep["reduces"] == ["mean"], (rep["k"], rep["reduces"])
    assert rep["honest_versions"] == 3 and all(len(s) == 3 for s in rep["slots"]), rep["slots"]
    for name, r in rep["attacks"].items():
        assert r["reduces"] == ["mda"], (name, r["reduces"])
        # pre-fix the same attacks moved the model 0.82 (flood) and 6.8 (replace) x the honest run's movement
        assert r["relative_distance"] < 0.5, (name, r["relative_distance"])
        assert math.isfinite(r["distance"])
        # the federation declares its input range in [model]: the model saturates the 6 σ trigger (312 K) to
        # the range's top (305 K) itself, so fed directly it scores exactly as the line delivers it (before
        # the range moved into the model: 22-30 points more success directly; RELIABILITY.md)
        assert r["backdoor_rate"] == r["line_backdoor_rate"], (name, r["backdoor_rate"], r["line_backdoor_rate"])
    # norm_to_median (the default under MDA and the median): every slot of every version enters at one length, the
    # buffer's median norm, so a delta's scale buys the attacker nothing (RELIABILITY.md, the samples attack)
    for name, r in rep["attacks"].items():
        for v, entries in r["lineages"].items():
            entered = [u["norm"] * u["clip_scale"] for u in entries]
            assert max(entered) <= min(entered) * (1 + 1e-5), (name, v, entered)
    assert rep["input_range"] and rep["trigger_value"] > rep["line_trigger_value"]
    assert rep["clean_backdoor_rate"] == rep["clean_line_backdoor_rate"]
    # the late rate averages the last three versions' rates: each a multiple of 1/76, so the mean one of 1/228
    for r in [rep["clean_late_rate"], *(a["late_rate"] for a in rep["attacks"].values())]:
        assert 0.0 <= r <= 1.0 and abs(r * 3 * 76 - round(r * 3 * 76)) < 1e-6, r
    # the defaults still learn AI4I's failures: 0.87 measured at three loops, 0.886 at six (RELIABILITY.md)
    assert rep["clean_auc"] > 0.75, rep["clean_auc"]
    check_one_slot_one_model(rep["attacks"]["flood"], rep["attacks"]["replace"])


def check_one_slot_one_model(a: dict, b: dict) -> None:
    """Two attacks whose slots reach the aggregator alike made the same model (robust14c, RELIABILITY.md).

    Flood's surviving update and replace's boosted one both point along ``X − G``, and both are the longest of the
    four slots, so ``norm_to_median`` rescales them to the same length (the median of the other norms): the same
    slots, left out or kept at the same coefficients, the same steps, and (float32 rounding of two scalings of one
    vector apart) the same final model. This holds only because the suite's training is seeded: on the old suite
    (batch order from the OS CSPRNG) every run trained on its own random batches and the two differed."""
    import numpy as np

    assert [[e["site"] for e in es] for es in a["lineages"].values()] == [
        [e["site"] for e in es] for es in b["lineages"].values()
    ]
    assert [e["weight"] for e in a["attacker_entries"]] == [e["weight"] for e in b["attacker_entries"]]
    assert a["steps"] == pytest.approx(b["steps"], rel=1e-5), (a["steps"], b["steps"])
    assert a["distance"] == pytest.approx(b["distance"], rel=1e-4, abs=1e-6), (a["distance"], b["distance"])
    assert a["backdoor_rate"] == b["backdoor_rate"] and a["late_rate"] == b["late_rate"]
    assert np.isfinite(a["distance"])


def test_a_sites_training_is_a_function_of_its_seed():
    """The suite's training repeats bit for bit for one seed and differs for another (it did neither before: the
    batch order came from the OS CSPRNG whatever the seed, RELIABILITY.md robust14c)."""
    import numpy as np

    from models import ModelSpec, build_model, shared_state

    data = suite.load_data()
    x, y = data.sites["site-a"]
    spec = ModelSpec(kind="mlp", n_features=5, hidden=[16], task="classification")
    base = shared_state(build_model(spec, seed=3), spec)
    first, again, other = (suite.train(spec, base, x, y, seed=s, epochs=1) for s in (7, 7, 8))
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert any(not np.array_equal(first[k], other[k]) for k in first)


@pytest.mark.slow
async def test_attack_suite_full_report(tmp_path):
    """Defaults (MDA) beside ``robust = "none"`` (the mean), six loops, all four attacks: fair shares,
    distances, and the default's backdoor success on average well below the mean's (RELIABILITY.md: development
    seeds 110-119, attack minus clean +0.14 with MDA against +0.27 with the median and +0.29 with the mean)."""
    rep = await suite.report(tmp_path / "defaults", loops=6)
    mean = await suite.report(tmp_path / "mean", loops=6, extra='robust = "none"')
    print("\n" + suite.table(rep) + "\n" + suite.table(mean))
    check_fair_share(rep)
    check_fair_share(mean)
    for name, r in rep["attacks"].items():
        assert r["reduces"] == ["mda"], (name, r["reduces"])
        assert r["relative_distance"] < 0.5, (name, r["relative_distance"])
    median_rate = statistics.mean(r["backdoor_rate"] for r in rep["attacks"].values())
    mean_rate = statistics.mean(r["backdoor_rate"] for r in mean["attacks"].values())
    assert median_rate <= mean_rate - 0.15, (median_rate, mean_rate)


IN_RANGE_SEEDS = (0, 1, 2, 3, 4)


@pytest.mark.slow
async def test_in_range_backdoor_stays_near_the_clean_rate(tmp_path):
    """A trigger the line can deliver (air temperature at the top of its engineering range, 305 K), defaults,
    five training seeds: the backdoor's success averaged over the four attacks is within 10 points of the clean
    model's average rate, each attack within 15; the plain mean (seed 0, the control) is at least 10 points
    above its clean model, so the attack has teeth. Issue 14's 5 points hold only on average over many runs
    (RELIABILITY.md: over 25 runs per attack -1 to +5 points; single runs scatter by ±0.11 and one five-seed
    run averaged +7), so five seeds cannot assert them without flaking. About 4 minutes."""
    reps = [
        await suite.report(tmp_path / f"s{seed}", loops=6, seed=seed, trigger="in_range") for seed in IN_RANGE_SEEDS
    ]
    for rep in reps:
        check_fair_share(rep)
        # every attacked version reduced with MDA; the clean model like for like is the mean of the three honest sites
        assert all(r["reduces"] == ["mda"] for r in rep["attacks"].values()), rep["attacks"].keys()
        assert rep["reduces"] == ["mean"] and rep["defaults_clean"]["reduces"] == ["mean"]
    clean = statistics.mean(rep["clean_backdoor_rate"] for rep in reps)
    per_attack = {a: statistics.mean(rep["attacks"][a]["backdoor_rate"] for rep in reps) for a in suite.ATTACKS}
    print(f"\nclean {clean:.3f}; " + ", ".join(f"{a} {v:.3f}" for a, v in per_attack.items()))
    assert statistics.mean(per_attack.values()) <= clean + 0.10, (clean, per_attack)
    for a, v in per_attack.items():
        assert v <= clean + 0.15, (a, v, clean)
    control = await suite.report(tmp_path / "mean", loops=6, extra='robust = "none"', trigger="in_range")
    pooled = statistics.mean(r["backdoor_rate"] for r in control["attacks"].values())
    assert pooled >= control["clean_backdoor_rate"] + 0.10, (pooled, control["clean_backdoor_rate"])
