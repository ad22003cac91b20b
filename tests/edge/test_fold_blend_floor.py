"""The small site's log-odds fold blend floors the plant model's log-odds (``[personal] fold_blend_floor``,
edge/personal.py ``compare``, ``Served``; edge/blend_export.py): below the floor only the partner orders the rows,
so a failure the plant's model put far below every normal row can be lifted (docs/tuning.md, eighteenth pass).
Numbers worked by hand, and the ONNX graph against each part scored alone by ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

from edge.blend_export import blend_scorer, export_served
from edge.personal import Choice, PersonalConfig, Served, build, compare, served_of
from models import export_onnx
from models.spec import ModelSpec
from tests.edge.blend_parts import model_params, ort_scores

CLS = ModelSpec(kind="mlp", n_features=3, hidden=[8], task="classification")
REG = ModelSpec(kind="mlp", n_features=3, hidden=[8], task="regression")


def test_the_floor_lifts_a_failure_the_plant_model_put_below_every_normal_row_worked_by_hand():
    """2 failures then 6 normal rows. Local-only log-odds 2, -30 / 1, 0, -1, -2, -3, -4: f2 below all six, AUC
    (6 + 0) / 12 = 0.5. Its lower quartile (numpy's linear rule): sorted -30, -4, -3, -2, -1, 0, 1, 2, position
    0.25 x 7 = 1.75, so -4 + 0.75 x 1 = -3.25. Partner 1, 3 / -1, -1, -2, -2, -3, -3. At w = 0.75:
    floored, f2 = 0.75 x -3.25 + 0.25 x 3 = -1.6875, above n4 (-1.5 - 0.5 = -2), n5 (-3) and n6 (-3.1875):
    AUC (6 + 3) / 12 = 0.75; unfloored f2 = -22.5 + 0.75 = -21.75, still below all: 0.5."""
    y = np.array([1.0, 1.0, 0, 0, 0, 0, 0, 0])
    local = np.array([2.0, -30, 1, 0, -1, -2, -3, -4])
    fed = np.array([1.0, 3, -1, -1, -2, -2, -3, -3])
    preds = {"local": local, "global": fed}
    plain, _, fit0 = compare(CLS, y, preds, None, (0.75,), partner="global")
    floored, tests, fit = compare(CLS, y, preds, None, (0.75,), partner="global", floor_q=0.25)
    assert plain["blend"] == 0.5 and fit0 is not None and fit0.floor is None
    assert fit is not None and fit.floor == pytest.approx(-3.25) and fit.weight == 0.75
    assert floored["blend"] == pytest.approx(0.75)
    # local-only's own score is its model's, not floored (floored, f2 would tie n6: 6.5 / 12)
    assert floored["local"] == 0.5 and "blend" in tests


def test_the_served_graph_floors_the_local_parts_log_odds_as_the_evidence_did():
    a, b = model_params(CLS, 1), model_params(CLS, 2)
    x = np.random.default_rng(0).normal(0, 2, (64, 3))
    pa = ort_scores(export_onnx(build(CLS, a), CLS), x)  # each part alone, as the line would score it
    pb = ort_scores(export_onnx(build(CLS, b), CLS), x)
    za, zb = np.log(pa / (1 - pa)), np.log(pb / (1 - pb))
    floor = float(np.median(za))  # binds on half the rows
    w = 0.6
    want = 1 / (1 + np.exp(-(w * np.maximum(za, floor) + (1 - w) * zb)))
    unfloored = 1 / (1 + np.exp(-(w * za + (1 - w) * zb)))
    assert np.max(np.abs(want - unfloored)) > 1e-3  # the floor changes rows: the test can tell
    served = Served(((w, a), (1 - w, b)), log_odds=True, floor=floor)
    assert ort_scores(export_served(CLS, served), x) == pytest.approx(want.tolist(), abs=2e-5)
    assert served.predict(CLS, x) == pytest.approx(want.tolist(), abs=2e-5)
    c = Choice("blend", "roc_auc", None, weight=w)
    c.blend_of, c.floor = "global", floor
    got = served_of({"local": a, "global": b}, c, log_odds=True)
    assert got.floor == floor and c.to_dict()["floor"] == round(floor, 4)
    assert served_of({"local": a, "global": b}, c, log_odds=False).floor is None  # probability blends: no floor
    with pytest.raises(ValueError, match="log-odds blend only"):
        blend_scorer(REG, build(REG, model_params(REG, 1)), build(REG, model_params(REG, 2)), 0.5, floor=0.0)


@pytest.mark.parametrize("q", [-0.1, 1.0])
def test_the_floor_is_a_quantile_below_one(q: float):
    with pytest.raises(ValueError, match="fold_blend_floor"):
        PersonalConfig(fold_blend_floor=q).validate()
    PersonalConfig(fold_blend_floor=0.0).validate()  # 0: no floor
