"""A classifier's blend in log-odds (``[personal] blend_space = "log_odds"``, edge/personal.py, edge/blend_export.py):
sigmoid(w * logit_local + (1 - w) * logit_fed), checked against numbers worked by hand and against each part scored
alone by ONNX Runtime."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from edge.blend import spread_matched
from edge.blend_export import blend_scorer, export_served
from edge.personal import (
    BlendFit,
    PersonalConfig,
    Personaliser,
    Served,
    blend_scores,
    compare,
    predict,
    train_local_only,
)
from models import export_onnx
from models.spec import ModelSpec
from tests.edge.blend_parts import model_params, ort_scores

CLS = ModelSpec(kind="mlp", n_features=3, hidden=[8], task="classification")
REG = ModelSpec(kind="mlp", n_features=3, hidden=[8], task="regression")


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return np.log(p / (1 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(z, dtype=np.float64)))


def test_the_log_odds_blend_reorders_a_pair_the_probability_blend_cannot_worked_by_hand():
    """2 failures (f1, f2), 2 normal rows (n1, n2). Local-only: 0.95, 0.2 / 0.9, 0.1 (f2 below n1: AUC 3/4).
    The partner's logits 0, 6 / -6, 0. w = 0.75 in probability: f2 = 0.15 + 0.25 x 0.99753 = 0.39938,
    n1 = 0.675 + 0.25 x 0.00247 = 0.67562: still below, AUC 3/4, a tie with local-only. In log-odds: local's
    are ln 19, ln 0.25 / ln 9, -ln 9, so f2 = 0.75 x -1.38629 + 0.25 x 6 = 0.46028 and
    n1 = 0.75 x 2.19722 - 1.5 = 0.14792: f2 above n1, every failure above every normal row, AUC 1."""
    y = np.array([1.0, 1.0, 0.0, 0.0])
    local_p = np.array([0.95, 0.2, 0.9, 0.1])
    fed_z = np.array([0.0, 6.0, -6.0, 0.0])
    by_prob, _, fit = compare(CLS, y, {"local": local_p, "fine_tuned": _sigmoid(fed_z)}, None, (0.75,))
    assert by_prob["local"] == 0.75 and by_prob["blend"] == 0.75 and fit is not None and fit.weight == 0.75
    by_odds, tests, _ = compare(CLS, y, {"local": _logit(local_p), "fine_tuned": fed_z}, None, (0.75,))
    assert by_odds["local"] == 0.75 and by_odds["blend"] == 1.0
    assert by_odds["fine_tuned"] == by_prob["fine_tuned"] == 0.875  # f1 and n2 tie at 0.5: a half pair
    assert tests["fine_tuned"].p == pytest.approx(
        compare(CLS, y, {"local": local_p, "fine_tuned": _sigmoid(fed_z)})[1]["fine_tuned"].p
    )
    want = _sigmoid(0.75 * _logit(local_p) + 0.25 * fed_z)
    assert want[1] == pytest.approx(_sigmoid(0.46028), abs=1e-5) and want[2] == pytest.approx(
        _sigmoid(0.14792), abs=1e-5
    )


def test_the_log_odds_blends_one_onnx_is_the_sigmoid_of_the_mixed_logits_of_each_part_alone():
    from edge.personal import build

    a, b = model_params(CLS, 1), model_params(CLS, 2)
    x = np.random.default_rng(0).normal(0, 2, (64, 3))
    pa = ort_scores(export_onnx(build(CLS, a), CLS), x)  # each part alone, as the line would score it
    pb = ort_scores(export_onnx(build(CLS, b), CLS), x)
    for w in (0.25, 0.75):
        want = _sigmoid(w * _logit(pa) + (1 - w) * _logit(pb))  # by hand from the parts' probabilities
        served = Served(((w, a), (1 - w, b)), log_odds=True)
        assert ort_scores(export_served(CLS, served), x) == pytest.approx(want.tolist(), abs=2e-5)
        assert served.predict(CLS, x) == pytest.approx(want.tolist(), abs=2e-5)
        in_prob = w * pa + (1 - w) * pb
        assert np.max(np.abs(want - in_prob)) > 1e-3  # the two spaces differ: the test can tell them apart
    assert blend_scores(CLS, a, x, True) == pytest.approx(_logit(pa).tolist(), abs=1e-4)
    assert blend_scores(CLS, a, x, False) == pytest.approx(pa.tolist(), abs=1e-6)
    with pytest.raises(ValueError, match="needs a classifier"):
        blend_scorer(REG, build(REG, model_params(REG, 1)), build(REG, model_params(REG, 2)), 0.5, log_odds=True)
    with pytest.raises(ValueError, match="blend_space"):
        PersonalConfig(blend_space="logit").validate()  # type: ignore[arg-type]


def _rows(n: int, seed: int, cut: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, 3)).astype(np.float32)
    y = ((x[:, 0] - x[:, 1] + 0.5 * rng.normal(size=n)) > cut).astype(np.float32).reshape(-1, 1)
    return x, y


@pytest.mark.parametrize("space", ["log_odds", "probability"])
def test_a_small_sites_fold_blend_serves_its_parts_mixed_in_the_configured_space(space):
    """A small site (fewer than 8 validation and 30 training failures) whose folds pick the 0.75 blend: the
    served scores are the two parts' mixed by hand, and the choice names the space. The partner is chosen by
    task (``fold_blend_of = "by_task"``): the global model in log-odds, the fine-tuned one in probability."""
    x, y = _rows(300, 5, 2.0)
    xv, yv = _rows(40, 6, 2.0)
    glob = train_local_only(CLS, *_rows(3000, 7, 2.0), PersonalConfig(local_epochs=3))  # a model of more rows
    cfg = PersonalConfig(local_epochs=4, finetune_epochs=1, cross_folds=3, blend_space=space)  # type: ignore[arg-type]
    p = Personaliser(cfg, CLS)
    served, c = p.choose(glob, x, y, xv, yv)
    assert (c.rule, c.kind, c.blend_of, c.blend_space) == (
        "too_small_folds_blended",
        "blend",
        "global" if space == "log_odds" else "fine_tuned",
        space,
    )
    assert c.to_dict()["blend_space"] == space
    assert p.folds is not None and p.folds.blend is not None
    # log-odds: the 0.75 is matched to the parts' spreads on the pool (fold_blend_scale = "spread", the default);
    # a probability blend mixes values on one scale and keeps the grid's 0.75 as it is
    w = c.weight
    assert w is not None and 0 < w < 1
    if space == "log_odds":
        assert p.folds.blend.nominal == 0.75 and w == p.folds.blend.weight
    else:
        assert (w, p.folds.blend.nominal) == (0.75, None)
    local, partner = served.parts[0][1], served.parts[1][1]
    assert local is p.local and [s for s, _ in served.parts] == pytest.approx([w, 1 - w])
    pl, pf = predict(CLS, local, xv).astype(np.float64), predict(CLS, partner, xv).astype(np.float64)
    # log-odds: local-only's part floored at its lower quartile on the pool (fold_blend_floor = 0.25, the default;
    # tests/edge/test_fold_blend_floor.py works one by hand); a probability blend has no floor
    floor = c.floor if space == "log_odds" else None
    assert (floor is not None) == (space == "log_odds") and served.floor == floor
    zl = _logit(pl) if floor is None else np.maximum(_logit(pl), floor)
    want = _sigmoid(w * zl + (1 - w) * _logit(pf)) if space == "log_odds" else 0.75 * pl + 0.25 * pf
    assert served.predict(CLS, xv) == pytest.approx(want.tolist(), abs=2e-5)
    assert c.validation_metric is not None and math.isfinite(c.validation_metric)
    if space == "log_odds":  # "raw" restores the thirteenth pass: the log-odds mixed at 0.75 as they are
        raw = Personaliser(replace(cfg, fold_blend_scale="raw"), CLS).choose(glob, x, y, xv, yv)[1]
        assert (raw.kind, raw.weight) == ("blend", 0.75) or raw.kind == "local"


def test_spread_matched_share_worked_by_hand():
    """share = (w / sd_local) / (w / sd_local + (1 - w) / sd_fed). Local-only log-odds 10, -1, 1, -10: mean 0,
    variance (100 + 1 + 1 + 100) / 4 = 50.5, sd 7.10634; the partner's 1, 1, -1, -1: sd 1. At w = 0.75:
    0.75 / 7.10634 = 0.105540, share 0.105540 / (0.105540 + 0.25) = 0.296844. Equal spreads leave w as it is;
    a constant part (sd 0) has nothing to match: w."""
    local, fed = np.array([10.0, -1.0, 1.0, -10.0]), np.array([1.0, 1.0, -1.0, -1.0])
    assert spread_matched(0.75, local, fed) == pytest.approx(0.296844, abs=1e-6)
    assert spread_matched(0.75, fed, local) == pytest.approx(0.75 * 7.10634 / (0.75 * 7.10634 + 0.25), abs=1e-6)
    assert spread_matched(0.6, 3 * fed, -3 * fed) == pytest.approx(0.6)
    assert spread_matched(0.75, np.zeros(4), fed) == 0.75


def test_the_spread_matched_fold_blend_reorders_a_pair_the_raw_one_ties_worked_by_hand():
    """2 failures (f1, f2), 2 normal rows (n1, n2). Local-only log-odds 10, -1 / 1, -10: f2 below n1, AUC 3/4;
    the partner's 1, 1 / -1, -1 (AUC 1). Raw at 0.75: f2 = -0.75 + 0.25 = -0.5, n1 = 0.75 - 0.25 = 0.5: f2 still
    below n1, AUC 3/4, a tie. Spread-matched, share 0.296844 (the test above): f2 = -0.296844 + 0.703156 =
    0.406312, n1 = -0.406312: every failure above every normal row, AUC 1."""
    y = np.array([1.0, 1.0, 0.0, 0.0])
    preds = {"local": np.array([10.0, -1.0, 1.0, -10.0]), "global": np.array([1.0, 1.0, -1.0, -1.0])}
    raw, _, fit_raw = compare(CLS, y, preds, None, (0.75,), "global")
    assert (raw["local"], raw["blend"], fit_raw) == (0.75, 0.75, BlendFit(0.75, "global"))
    matched, _, fit = compare(CLS, y, preds, None, (0.75,), "global", spread=True)
    assert matched["blend"] == 1.0 and fit is not None and (fit.of, fit.nominal) == ("global", 0.75)
    assert fit.weight == pytest.approx(0.296844, abs=1e-6)
    # a grid: the best of the matched shares on these rows, named with the w it matched
    _, _, fit2 = compare(CLS, y, preds, None, (0.9, 0.75), "global", spread=True)
    assert fit2 is not None and fit2.nominal == 0.75  # 0.9 matches 0.558786: f2 still below n1, AUC 3/4
    with pytest.raises(ValueError, match="fold_blend_scale"):
        PersonalConfig(fold_blend_scale="z").validate()  # type: ignore[arg-type]


def test_a_regression_fold_blend_keeps_its_share_as_it_is():
    """Regression blends values in the plant's units, one scale already: ``fold_blend_scale`` leaves its 0.75 alone
    (the C-MAPSS rule is unchanged by the fourteenth pass)."""
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (25, 3)).astype(np.float32)  # 25 training rows (< 30), 20 validation rows (< 30): folds
    y = (x[:, :1] - x[:, 1:2]).astype(np.float32)
    xv = rng.normal(0, 1, (20, 3)).astype(np.float32)
    yv = (xv[:, :1] - xv[:, 1:2]).astype(np.float32)
    cfg = PersonalConfig(local_epochs=3, finetune_epochs=1, cross_folds=3)
    p = Personaliser(cfg, REG)
    _, c = p.choose(model_params(REG, 4), x, y, xv, yv)
    assert p.folds is not None and p.folds.blend == BlendFit(0.75, "fine_tuned")  # nominal None: not matched
    assert c.rule in ("too_small_folds_blended", "too_small_folds_kept_local")
    assert c.weight == (0.75 if c.kind == "blend" else None)
