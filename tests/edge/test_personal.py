"""The served model: local-only / global / fine-tuned, picked on the validation rows (edge/personal.py)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from edge.paired_evidence import Evidence, mse_evidence
from edge.personal import PersonalConfig, Personaliser, local_evidence, pick, too_small
from models.spec import ModelSpec

CLS = ModelSpec(kind="mlp", n_features=2, hidden=[8], task="classification")
REG = ModelSpec(kind="mlp", n_features=2, hidden=[8], task="regression")


def _ev(p: float, test: str = "delong") -> Evidence:
    return Evidence(gain=0.01, se=0.01, p=p, units=10, test=test)


def test_a_federation_candidate_replaces_local_only_only_on_a_significant_paired_test():
    """switch_alpha 0.05 shared by the two federation candidates (Bonferroni): each must reach p < 0.025."""
    cfg = PersonalConfig(min_validation_rows=10, min_validation_positives=3, switch_alpha=0.05)
    y = np.array([1.0] * 5 + [0.0] * 45)
    scores = {"local": 0.90, "global": 0.95, "fine_tuned": 0.93}
    kept = pick(CLS, scores, y, cfg, tests={"global": _ev(0.03), "fine_tuned": _ev(0.2)})
    assert (kept.kind, kept.rule, kept.p, kept.validation_metric) == ("local", "paired_test_kept_local", 0.03, 0.90)
    assert "global vs local-only" in kept.reason and "p = 0.03 >= 0.025" in kept.reason
    switched = pick(CLS, scores, y, cfg, tests={"global": _ev(0.02), "fine_tuned": _ev(0.2)})
    assert (switched.kind, switched.rule, switched.p) == ("global", "paired_test_switched", 0.02)
    both = pick(CLS, scores, y, cfg, tests={"global": _ev(0.02), "fine_tuned": _ev(0.001)})
    assert both.kind == "global"  # both pass: the better validation score wins, not the smaller p
    alone = pick(CLS, scores, y, cfg, tests={"global": _ev(0.03)})  # one candidate tested: it has all of alpha
    assert alone.kind == "global"
    untested = pick(CLS, scores, y, cfg)  # no paired test could run: nothing shows a candidate better
    assert untested.kind == "local" and "no paired test" in untested.reason
    r = pick(
        REG,
        {"local": 12.0, "global": 9.5, "fine_tuned": 10.0},
        np.zeros(50),
        cfg,
        tests={"global": _ev(0.001, "paired-mse"), "fine_tuned": _ev(0.001, "paired-mse")},
    )
    assert (r.kind, r.metric) == ("global", "rmse")  # lower RMSE is better
    assert r.to_dict()["rule"] == "paired_test_switched" and r.to_dict()["p"] == 0.001


def test_without_a_local_only_model_the_best_federation_candidate_is_served():
    cfg = PersonalConfig(min_validation_rows=10, min_validation_positives=3)
    y = np.array([1.0] * 5 + [0.0] * 45)
    nan = pick(CLS, {"local": math.nan, "global": 0.7, "fine_tuned": math.nan}, y, cfg)
    assert (nan.kind, nan.rule) == ("global", "no_local")
    tie = pick(CLS, {"global": 0.9, "fine_tuned": 0.9}, y, cfg)
    assert tie.kind == "fine_tuned"  # between the federation's two, a tie goes to the fine-tuned one


def test_the_paired_test_keeps_an_engine_plant_on_its_own_model_when_one_engine_makes_the_difference():
    """test_paired_evidence's five engines: the global model's RMSE is 10.6 % lower on validation, all of it
    on engine A; p = 0.187 on 4 df, so local-only stays (the old 2 % margin rule would have switched)."""
    cfg = PersonalConfig(min_validation_rows=10, min_validation_units=5, switch_alpha=0.2)  # each at 0.1
    y, units = np.zeros(10), list("AABBCCDDEE")
    glob = np.array([0, 0] + [1] * 8, dtype=float)
    tests = {"global": mse_evidence(y, glob, np.ones(10), units), "fine_tuned": _ev(0.9, "paired-mse")}
    scores = {"local": 1.0, "global": math.sqrt(0.8), "fine_tuned": 1.2}
    c = pick(REG, scores, y, cfg, evidence=40, tests=tests, units=units)
    assert (c.kind, c.rule) == ("local", "paired_test_kept_local") and c.p == pytest.approx(0.18695, abs=1e-5)
    assert "on 5 validation units" in c.reason and ">= 0.1" in c.reason


def test_a_slice_too_small_to_decide_says_so_and_serves_the_fine_tuned_model():
    cfg = PersonalConfig(min_validation_rows=30, min_validation_positives=8)
    few_failures = np.array([1.0] * 3 + [0.0] * 157)  # 160 rows, 3 failures: one failure moves the AUC by 0.17
    c = pick(CLS, {"local": 0.99, "global": 0.80, "fine_tuned": 0.85}, few_failures, cfg)
    assert c.kind == "fine_tuned" and "too small" in c.reason and "3 rows of its rarer class" in c.reason
    assert c.rule == "too_small_fine_tuned"
    assert "too small" in too_small(REG, np.zeros(12), cfg)
    assert too_small(REG, np.zeros(30), cfg) is None
    assert c.to_dict()["candidates"] == {"local": 0.99, "global": 0.8, "fine_tuned": 0.85}


def test_a_slice_too_small_to_decide_keeps_local_only_where_the_site_trained_on_enough_of_the_rarer_class():
    """A mid-size plant whose validation slice drew 7 failures: nothing shows a federation candidate better,
    and its own model learnt from 55 failures, so it keeps local-only; the smallest plant (12) gets fine-tuned."""
    cfg = PersonalConfig(min_validation_rows=30, min_validation_positives=8, min_local_positives=30)
    seven = np.array([1.0] * 7 + [0.0] * 473)
    scores = {"local": 0.95, "global": 0.97, "fine_tuned": 0.98}  # fine-tuned ahead by 0.03, on 7 failures
    kept = pick(CLS, scores, seven, cfg, evidence=55)
    assert (kept.kind, kept.validation_metric) == ("local", 0.95)
    assert "7 rows of its rarer class < 8" in kept.reason and "trained on 55 rows of its rarer class" in kept.reason
    assert pick(CLS, scores, seven, cfg, evidence=29).kind == "fine_tuned"  # 29 < 30: the smallest plant's case
    assert pick(CLS, scores, seven, cfg, evidence=30).kind == "local"
    no_local = {"global": 0.97, "fine_tuned": 0.98}  # no local-only model yet: nothing to keep
    assert pick(CLS, no_local, seven, cfg, evidence=55).kind == "fine_tuned"
    # regression: the evidence is rows; 20 validation rows cannot decide, 40 training rows are enough to keep
    assert pick(REG, {"local": 3.0, "global": 2.0, "fine_tuned": 2.0}, np.zeros(20), cfg, evidence=40).kind == "local"


def test_a_grouped_regression_slice_counts_engines_and_so_does_the_local_evidence():
    """The regression equivalent of the rarer-class rule: with a group column the independent evidence is
    units (each engine run to failure is one failure). 200 validation rows of 4 engines cannot decide (< 5);
    a plant whose training rows hold 24 engines (< 30) serves the fine-tuned model, one with 36 keeps its own."""
    cfg = PersonalConfig(min_validation_rows=30, min_validation_units=5, min_local_positives=30)
    y, four = np.zeros(200), [str(i // 50) for i in range(200)]
    assert too_small(REG, y, cfg, four) == "validation slice too small to decide: 4 units < 5"
    assert too_small(REG, y, cfg, [str(i // 40) for i in range(200)]) is None  # 5 engines
    assert too_small(REG, y, cfg) is None  # without units: 200 independent rows
    scores = {"local": 0.15, "global": 0.17, "fine_tuned": 0.14}
    small = pick(REG, scores, y, cfg, evidence=local_evidence(REG, np.zeros(3000), 3000, train_units=24), units=four)
    assert (small.kind, small.rule) == ("fine_tuned", "too_small_fine_tuned") and "24 (< 30)" in small.reason
    big = pick(REG, scores, y, cfg, evidence=36, units=four)
    assert (big.kind, big.rule) == ("local", "too_small_kept_local") and "trained on 36 units" in big.reason


def test_local_evidence_counts_the_rarer_class_of_the_training_rows():
    y = np.array([1.0] * 12 + [0.0] * 630).reshape(-1, 1)
    assert local_evidence(CLS, y, len(y)) == 12  # failures are the rarer class
    assert local_evidence(CLS, 1.0 - y, len(y)) == 12  # whichever label is rarer
    assert local_evidence(REG, np.zeros(642), 642) == 642
    assert local_evidence(CLS, None, 642) == 0  # no labels (anomaly): nothing to keep local-only on


def _task(n: int, flip: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.uniform(0, 1, (n, 2)).astype(np.float32)
    y = (x[:, 0] > 0.5) if not flip else (x[:, 0] < 0.5)
    return x, y.astype(np.float32).reshape(-1, 1)


def test_personaliser_serves_the_local_model_where_the_global_one_is_wrong_for_this_plant():
    """A plant whose label is the reverse of the federation's: its own model wins on validation."""
    from edge.personal import train_local_only

    rng = np.random.default_rng(0)
    cfg = PersonalConfig(
        local_epochs=20, finetune_epochs=1, finetune_lr=0.001, min_validation_rows=30, min_validation_positives=8
    )
    xg, yg = _task(600, False, rng)
    global_params = train_local_only(CLS, xg, yg, cfg)  # stands in for a global model of the other plants
    x, y = _task(600, True, rng)
    xv, yv = _task(200, True, rng)
    p = Personaliser(cfg, CLS)
    served, choice = p.choose(global_params, x, y, xv, yv)
    assert choice.kind == "local" and choice.validation_metric > 0.95
    assert choice.candidates["global"] < 0.1  # the federation's model ranks this plant's rows backwards
    ((w, params),) = served.parts
    assert w == 1.0 and set(params) == set(global_params) and p.local_rows == 600
    again_served, again = p.choose(global_params, x, y, xv, yv)  # same rows: the local model is kept
    again_params = again_served.parts[0][1]
    assert again.kind == "local" and all(np.array_equal(again_params[k], params[k]) for k in params)


def test_personaliser_fine_tunes_the_global_model_where_the_plant_has_few_rows():
    from edge.personal import train_local_only

    rng = np.random.default_rng(1)
    cfg = PersonalConfig(
        local_epochs=20, finetune_epochs=2, finetune_lr=0.01, min_validation_rows=30, min_validation_positives=8
    )
    xg, yg = _task(3000, False, rng)
    global_params = train_local_only(CLS, xg, yg, cfg)
    x, y = _task(12, False, rng)
    xv, yv = _task(20, False, rng)  # 20 validation rows: too few to decide
    p = Personaliser(cfg, CLS)
    served, choice = p.choose(global_params, x, y, xv, yv)
    # 12 training rows (< 30 of each class): their folds join the evidence; on 12 + 20 rows the blend of
    # 0.75 x local-only and 0.25 x the better federation model scores above local-only: the blend is served
    # (its log-odds share 0.75 matched to the parts' spreads on the pool: edge/blend.py spread_matched)
    assert (choice.kind, choice.rule) == ("blend", "too_small_folds_blended")
    assert "too small" in choice.reason and p.folds is not None and p.folds.blend is not None
    assert p.folds.scores["blend"] > p.folds.scores["local"] and choice.blend_of == p.folds.blend.of
    assert (p.folds.blend.nominal, choice.weight) == (0.75, p.folds.blend.weight) and 0 < choice.weight < 1
    assert [w for w, _ in served.parts] == pytest.approx([choice.weight, 1 - choice.weight])
    assert choice.validation_metric is not None  # the served blend scored on the 20 validation rows
    # without the fold blend (the eighth pass): the federation's model alone, shown better on the pool
    choice = Personaliser(replace(cfg, fold_blend_weights=()), CLS).choose(global_params, x, y, xv, yv)[1]
    assert choice.kind == "fine_tuned" and "too small" in choice.reason
    assert choice.candidates["fine_tuned"] > 0.9  # still the federation's good model, adapted a little
    assert choice.rule == "too_small_folds_switched" and choice.p is not None and choice.p < 0.1
    blind = Personaliser(replace(cfg, cross_folds=0), CLS).choose(global_params, x, y, xv, yv)[1]
    assert (blind.kind, blind.rule) == ("fine_tuned", "too_small_fine_tuned")  # folds off: the rule


def test_personaliser_keeps_local_only_when_a_well_trained_site_cannot_validate():
    """choose() counts the rarer class of the rows it trains on: 600 rows (about 300 of each) are enough."""
    from edge.personal import train_local_only

    rng = np.random.default_rng(2)
    cfg = PersonalConfig(local_epochs=5, finetune_epochs=1, min_validation_rows=30, min_validation_positives=8)
    xg, yg = _task(600, False, rng)
    global_params = train_local_only(CLS, xg, yg, cfg)
    x, y = _task(600, False, rng)
    xv, yv = _task(20, False, rng)  # 20 validation rows: too few to decide
    _, choice = Personaliser(cfg, CLS).choose(global_params, x, y, xv, yv)
    assert choice.kind == "local" and "too small" in choice.reason and "local-only kept" in choice.reason


def test_choose_from_reads_each_rows_unit_from_the_sites_store(tmp_path):
    """The edge's path (edge/line_export.py): the store's units reach the pick. 40 engines of 10 rows, a quarter
    held out by hash: the paired test runs over the held-out engines; with 8 engines the slice is too small and
    the training engines are the evidence."""
    from edge.dataset import Dataset, group_in_holdout, group_key
    from edge.personal import train_local_only

    rng = np.random.default_rng(3)
    cfg = PersonalConfig(local_epochs=2, finetune_epochs=1, min_validation_rows=5)
    for engines in (40, 8):
        ds = Dataset(tmp_path / f"{engines}.sqlite", (2,), 1, max_rows=10_000, holdout_fraction=0.25, split="group")
        x = rng.uniform(0, 1, (engines * 10, 2)).astype(np.float32)
        units = [i // 10 for i in range(engines * 10)]
        ds.add_many([(xi, np.array([xi[0]], np.float32)) for xi in x], groups=units)
        held = {u for u in set(units) if group_in_holdout(group_key(u), 0.25)}
        glob = train_local_only(REG, x, x[:, :1], cfg)
        p = Personaliser(cfg, REG)
        _, choice = p.choose_from(ds, glob)
        if engines == 40:
            assert len(held) >= 5 and choice.rule.startswith("paired_test")
            assert f"on {len(held)} validation units" in choice.reason or "better than local-only" in choice.reason
        else:
            assert 0 < len(held) < 5, held  # this hash holds out between 1 and 4 of 8 engines
            # too small, and 8 - held training engines (< 30): the training engines' folds join the evidence
            assert choice.rule.startswith("too_small_folds_")
            assert f"{len(held)} units < 5" in choice.reason and f"trained on {8 - len(held)} (< 30)" in choice.reason
            folds = p.folds
            assert folds is not None and folds.units == 8  # every engine: the training ones out of fold, and held
            assert (
                folds.folds == min(5, 8 - len(held)) and f"{folds.folds} training folds + validation" in choice.reason
            )
        ds.close()


def test_a_too_small_site_with_little_local_evidence_applies_the_switching_rule_to_its_training_folds():
    """The folds' evidence (edge/unit_folds.py) goes through the same paired test as a validation slice: a
    federation candidate is served only at p < switch_alpha / 2; a site with 30+ units keeps local-only."""
    from edge.personal import FoldEvidence

    cfg = PersonalConfig(min_validation_rows=30, min_validation_units=5, min_local_positives=30, switch_alpha=0.2)
    y, one_engine = np.zeros(60), ["7"] * 60  # a validation slice of one engine: too small
    val = {"local": 0.20, "global": 0.15, "fine_tuned": 0.16}

    def folds(p_global: float, p_fine: float) -> FoldEvidence:
        return FoldEvidence(
            scores={"local": 0.17, "global": 0.14, "fine_tuned": 0.15},
            tests={"global": _ev(p_global, "paired-mse"), "fine_tuned": _ev(p_fine, "paired-mse")},
            rows=900,
            units=15,
            folds=5,
        )

    switched = pick(REG, val, y, cfg, evidence=14, units=one_engine, folds=folds(0.03, 0.5))
    assert (switched.kind, switched.rule, switched.p) == ("global", "too_small_folds_switched", 0.03)
    assert "1 units < 5" in switched.reason and "on 5 training folds + validation: p = 0.03 < 0.1" in switched.reason
    assert switched.validation_metric == 0.15  # the line's status still reports the validation metric
    both = pick(REG, val, y, cfg, evidence=14, units=one_engine, folds=folds(0.09, 0.001))
    assert both.kind == "global"  # both pass at 0.1: the better out-of-fold score, not the smaller p
    kept = pick(REG, val, y, cfg, evidence=14, units=one_engine, folds=folds(0.11, 0.2))
    assert (kept.kind, kept.rule, kept.p) == ("local", "too_small_folds_kept_local", 0.11)
    assert "global vs local-only on 10 5 training folds + validation units: p = 0.11 >= 0.1" in kept.reason
    big = pick(REG, val, y, cfg, evidence=30, units=one_engine, folds=folds(0.001, 0.001))
    assert (big.kind, big.rule) == ("local", "too_small_kept_local")  # 30 training units: its own model stays


def test_the_fold_models_of_local_only_are_kept_while_the_training_rows_stay_the_same():
    """A new global version redoes only the fold fine-tunes; other training rows retrain the fold models."""
    from edge.personal import train_local_only

    rng = np.random.default_rng(4)
    cfg = PersonalConfig(local_epochs=2, finetune_epochs=1, min_validation_rows=30, cross_folds=3)
    x, y = _task(40, False, rng)  # at most 20 of the rarer class (< 30): the folds decide
    xv, yv = _task(10, False, rng)  # 10 validation rows: too small
    glob = train_local_only(CLS, *_task(300, False, rng), cfg)
    p = Personaliser(cfg, CLS)
    p.choose(glob, x, y, xv, yv)
    first = dict(p._fold_local)
    assert sorted(first) == [0, 1, 2] and p.folds is not None and p.folds.folds == 3 and p.folds.rows == 50
    p.choose(glob, x, y, xv, yv)  # the next version, the same rows
    assert all(p._fold_local[k] is first[k] for k in first)
    x2, y2 = _task(40, False, rng)
    p.choose(glob, x2, y2, xv, yv)
    assert all(p._fold_local[k] is not first[k] for k in first)


def test_build_takes_read_only_parameters_without_a_warning():
    """Decoded tensors (FLT2 views of a received buffer) are read-only; torch warns on a read-only array given to
    ``from_numpy``. ``build`` copies them: no warning, and the model holds the values."""
    import warnings

    from edge.personal import build
    from models import build_model

    params = {k: v.detach().numpy().copy() for k, v in build_model(CLS, seed=1).state_dict().items()}
    for v in params.values():
        v += 0.5
        v.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build(CLS, params)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), params[k])
