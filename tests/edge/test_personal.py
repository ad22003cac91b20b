"""The served model: local-only / global / fine-tuned, picked on the validation rows (edge/personal.py)."""

from __future__ import annotations

import math

import numpy as np

from edge.personal import PersonalConfig, Personaliser, local_evidence, pick, too_small
from models.spec import ModelSpec

CLS = ModelSpec(kind="mlp", n_features=2, hidden=[8], task="classification")
REG = ModelSpec(kind="mlp", n_features=2, hidden=[8], task="regression")


def test_pick_takes_the_best_validation_metric_in_its_direction():
    cfg = PersonalConfig(min_validation_rows=10, min_validation_positives=3)
    y = np.array([1.0] * 5 + [0.0] * 45)
    c = pick(CLS, {"local": 0.91, "global": 0.88, "fine_tuned": 0.90}, y, cfg)
    assert (c.kind, c.validation_metric, c.validation_rows) == ("local", 0.91, 50)
    r = pick(REG, {"local": 12.0, "global": 9.5, "fine_tuned": 10.0}, np.zeros(50), cfg)
    assert r.kind == "global" and r.metric == "rmse"  # lower RMSE wins
    tie = pick(CLS, {"local": 0.8, "global": 0.9, "fine_tuned": 0.9}, y, cfg)
    assert tie.kind == "fine_tuned"  # between the federation's two, a tie goes to the fine-tuned one
    nan = pick(CLS, {"local": math.nan, "global": 0.7, "fine_tuned": math.nan}, y, cfg)
    assert nan.kind == "global"


def test_a_federation_candidate_must_lead_local_only_by_the_margin():
    cfg = PersonalConfig(min_validation_rows=10, min_validation_positives=3, margin=0.02)
    y = np.array([1.0] * 5 + [0.0] * 45)
    assert pick(CLS, {"local": 0.90, "global": 0.80, "fine_tuned": 0.915}, y, cfg).kind == "local"  # +0.015
    assert pick(CLS, {"local": 0.90, "global": 0.80, "fine_tuned": 0.925}, y, cfg).kind == "fine_tuned"  # +0.025
    z = np.zeros(50)
    assert pick(REG, {"local": 10.0, "global": 9.9, "fine_tuned": 11.0}, z, cfg).kind == "local"  # 1 % better
    assert pick(REG, {"local": 10.0, "global": 9.7, "fine_tuned": 11.0}, z, cfg).kind == "global"  # 3 % better
    assert pick(CLS, {"local": 0.9, "global": 0.9, "fine_tuned": 0.9}, y, cfg).kind == "local"  # a tie keeps it


def test_a_slice_too_small_to_decide_says_so_and_serves_the_fine_tuned_model():
    cfg = PersonalConfig(min_validation_rows=30, min_validation_positives=8)
    few_failures = np.array([1.0] * 3 + [0.0] * 157)  # 160 rows, 3 failures: one failure moves the AUC by 0.17
    c = pick(CLS, {"local": 0.99, "global": 0.80, "fine_tuned": 0.85}, few_failures, cfg)
    assert c.kind == "fine_tuned" and "too small" in c.reason and "3 rows of its rarer class" in c.reason
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
    params, choice = p.choose(global_params, x, y, xv, yv)
    assert choice.kind == "local" and choice.validation_metric > 0.95
    assert choice.candidates["global"] < 0.1  # the federation's model ranks this plant's rows backwards
    assert set(params) == set(global_params) and p.local_rows == 600
    again_params, again = p.choose(global_params, x, y, xv, yv)  # same rows: the local model is kept
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
    _, choice = Personaliser(cfg, CLS).choose(global_params, x, y, xv, yv)
    assert choice.kind == "fine_tuned" and "too small" in choice.reason
    assert choice.candidates["fine_tuned"] > 0.9  # still the federation's good model, adapted a little


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
