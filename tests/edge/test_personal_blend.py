"""The blend candidate (edge/blend.py, edge/blend_export.py): its weight, its place in the pick, its one ONNX."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest

from edge.blend import best_weight, check_grid, mix
from edge.blend_export import export_served
from edge.paired_evidence import Evidence, auc_evidence
from edge.personal import (
    BlendFit,
    BlendOption,
    Choice,
    PersonalConfig,
    Served,
    compare,
    pick,
    served_of,
    train_local_only,
)
from models import build_model, export_onnx
from models.flat import personal_state, shared_state
from models.spec import ModelSpec

CLS = ModelSpec(kind="mlp", n_features=3, hidden=[8], task="classification")
REG = ModelSpec(kind="mlp", n_features=3, hidden=[8], task="regression")


def _ort(onnx: bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x.astype(np.float32)})[0].ravel().astype(np.float64)


def _params(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    m = build_model(spec, seed=seed)
    return {**shared_state(m, spec), **personal_state(m, spec)}


@pytest.mark.parametrize("spec", [CLS, REG], ids=["classification", "regression"])
def test_the_blends_one_onnx_scores_w_a_plus_one_minus_w_b_in_onnx_runtime(spec):
    """Each part exported alone and scored by ONNX Runtime is the independent reference: the single blend
    graph must return w * a + (1 - w) * b of those (probabilities for classification, values for regression)."""
    from edge.personal import build

    a, b = _params(spec, 1), _params(spec, 2)
    x = np.random.default_rng(0).normal(0, 2, (64, 3))
    score_a = _ort(export_onnx(build(spec, a), spec), x)
    score_b = _ort(export_onnx(build(spec, b), spec), x)
    assert np.max(np.abs(score_a - score_b)) > 1e-3  # two different models: the weight matters
    for w in (0.25, 0.5, 0.75):
        onnx = export_served(spec, Served(((w, a), (1 - w, b))))
        got = _ort(onnx, x)
        want = [w * sa + (1 - w) * sb for sa, sb in zip(score_a, score_b)]  # by hand, row by row
        assert got == pytest.approx(want, abs=1e-5)
        sess = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])  # the line's contract
        assert [i.name for i in sess.get_inputs()] == ["x"] and [o.name for o in sess.get_outputs()] == ["y"]
    if spec.task == "classification":
        assert np.all((got > 0) & (got < 1))  # a mean of probabilities is a probability
    one = _ort(export_served(spec, Served(((1.0, a),))), x)  # one candidate: exported as it is
    assert one == pytest.approx(score_a.tolist(), abs=1e-6)
    with pytest.raises(ValueError, match="weights sum to 1"):
        export_served(spec, Served(((0.5, a), (0.6, b))))


def test_the_blends_weight_is_the_grids_best_on_the_evidence_rows():
    """Worked by hand: 2 failures (f1, f2), 2 normal rows (n1, n2). Local-only scores them 0.2, 0.9 / 0.1, 0.6
    (f1 below n2: AUC 3/4), the federation model 0.9, 0.3 / 0.6, 0.1 (f2 below n1: 3/4). w = 0.25 gives
    0.725, 0.45 / 0.475, 0.225 (f2 below n1: 3/4), w = 0.75 gives 0.375, 0.75 / 0.225, 0.475 (f1 below n2: 3/4),
    w = 0.5 gives 0.55, 0.6 / 0.35, 0.35: every failure above every normal row, AUC 1."""
    y = np.array([1.0, 1.0, 0.0, 0.0])
    local = np.array([0.2, 0.9, 0.1, 0.6])
    fed = np.array([0.9, 0.3, 0.6, 0.1])
    assert mix(0.25, local, fed) == pytest.approx([0.725, 0.45, 0.475, 0.225])
    assert mix(0.75, local, fed) == pytest.approx([0.375, 0.75, 0.225, 0.475])
    assert best_weight("roc_auc", y, local, fed, (0.25, 0.5, 0.75)) == 0.5
    # regression: local errs +2 on every row, fed -2: w = 0.5 is exact; among (0.25, 0.75) both are off by 1
    yr = np.array([10.0, 20.0, 30.0])
    assert best_weight("rmse", yr, yr + 2, yr - 2, (0.25, 0.5, 0.75)) == 0.5
    assert best_weight("rmse", yr, yr + 2, yr - 2, (0.25, 0.75)) == 0.25  # a tie: the grid's first
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        check_grid((0.5, 1.0))
    with pytest.raises(ValueError, match="blend_weights"):
        PersonalConfig(blend_weights=(0.0,)).validate()


def _ev(p: float) -> Evidence:
    return Evidence(gain=0.01, se=0.01, p=p, units=50, test="delong")


def test_the_blend_replaces_local_only_only_on_its_own_paired_test_and_names_its_weight():
    """The blend is a third federation candidate: switch_alpha 0.3 shared by three, each at p < 0.1."""
    cfg = PersonalConfig(min_validation_rows=10, min_validation_positives=3, switch_alpha=0.3)
    y = np.array([1.0] * 5 + [0.0] * 45)
    scores = {"local": 0.90, "global": 0.88, "fine_tuned": 0.89, "blend": 0.93}
    fit = BlendFit(0.75, "fine_tuned")
    kept = pick(CLS, scores, y, cfg, tests={"global": _ev(0.6), "fine_tuned": _ev(0.4), "blend": _ev(0.11)}, fit=fit)
    assert (kept.kind, kept.weight, kept.p) == ("local", None, 0.11) and ">= 0.1" in kept.reason
    c = pick(CLS, scores, y, cfg, tests={"global": _ev(0.6), "fine_tuned": _ev(0.4), "blend": _ev(0.09)}, fit=fit)
    assert (c.kind, c.rule, c.weight, c.blend_of, c.validation_metric) == (
        "blend",
        "paired_test_switched",
        0.75,
        "fine_tuned",
        0.93,
    )
    doc = c.to_dict()
    assert (doc["kind"], doc["weight"], doc["blend_of"]) == ("blend", 0.75, "fine_tuned")
    local, ft = {"w": np.ones(2)}, {"w": np.zeros(2)}
    served = served_of({"local": local, "fine_tuned": ft, "global": {"w": np.full(2, 5.0)}}, c)
    assert [w for w, _ in served.parts] == [0.75, 0.25] and served.parts[0][1] is local and served.parts[1][1] is ft
    with pytest.raises(ValueError, match="without its fit"):
        pick(CLS, scores, y, cfg, tests={"blend": _ev(0.01)})


def test_each_validation_blend_is_a_candidate_of_its_own_with_its_own_paired_test():
    """Worked by hand (the rows of the weight test above): local-only 0.2, 0.9 / 0.1, 0.6 and fine-tuned 0.9, 0.3 /
    0.6, 0.1 on 2 failures and 2 normal rows; blends at w = 0.25, 0.5, 0.75 order 3, 4, 3 of the 4 pairs (ROC AUC
    0.75, 1.0, 0.75). Global scores every row 0.5: its blends keep local-only's order (0.75 each). Every blend of
    the grid with every partner is scored and carries its own paired test, the same as DeLong's test of that
    blend's scores against local-only's run alone."""
    y = np.array([1.0, 1.0, 0.0, 0.0])
    local = np.array([0.2, 0.9, 0.1, 0.6])
    preds = {"local": local, "fine_tuned": np.array([0.9, 0.3, 0.6, 0.1]), "global": np.full(4, 0.5)}
    scores, _, fit = compare(CLS, y, preds, None, (0.25, 0.5, 0.75), each=True)
    assert fit is not None and len(fit.options) == 6
    got = {(o.of, o.weight): o.score for o in fit.options}
    assert got == pytest.approx(
        {
            ("fine_tuned", 0.25): 0.75,
            ("fine_tuned", 0.5): 1.0,
            ("fine_tuned", 0.75): 0.75,
            ("global", 0.25): 0.75,
            ("global", 0.5): 0.75,
            ("global", 0.75): 0.75,
        }
    )
    for o in fit.options:
        alone = auc_evidence(y, mix(o.weight, local, preds[o.of]), local)
        assert (o.evidence.gain, o.evidence.p) == pytest.approx((alone.gain, alone.p), nan_ok=True)
    assert (fit.weight, fit.of, scores["blend"]) == (0.5, "fine_tuned", 1.0)  # the status shows the best one


def test_the_switching_rule_shares_switch_alpha_with_every_blend_it_tested():
    """The defaults: switch_alpha 0.2 over fine-tuned, global and 3 x 2 blends, each at 0.2 / 8 = 0.025 (one chosen
    blend counted once, the fourteenth pass: 0.2 / 3 = 0.0667). L2 on a report split of the fourteenth pass and
    this one (fine-tuned against local-only p = 0.055) keeps local-only; counted once it switched."""
    y = np.array([1.0] * 15 + [0.0] * 465)
    scores = {"local": 0.907, "global": 0.889, "fine_tuned": 0.936, "blend": 0.93}
    ps = [0.03, 0.2, 0.5, 0.6, 0.7, 0.8]  # (fine_tuned, 0.25), (fine_tuned, 0.5), ... (global, 0.75)
    sc = [0.93, 0.925, 0.915, 0.9, 0.9, 0.905]
    grid = [(of, w) for of in ("fine_tuned", "global") for w in (0.25, 0.5, 0.75)]

    def fit(p: list[float], s: list[float]) -> BlendFit:
        opts = tuple(BlendOption(w, of, si, _ev(pi)) for (of, w), pi, si in zip(grid, p, s))
        return BlendFit(0.25, "fine_tuned", options=opts)

    tests = {"fine_tuned": _ev(0.055), "global": _ev(0.6), "blend": _ev(0.03)}
    kept = pick(CLS, scores, y, PersonalConfig(), tests=tests, fit=fit(ps, sc))
    assert (kept.kind, kept.rule, kept.p) == ("local", "paired_test_kept_local", 0.03)
    assert "blend 0.25 x local-only + 0.75 x fine_tuned" in kept.reason and "p = 0.03 >= 0.025" in kept.reason
    chosen = pick(CLS, scores, y, PersonalConfig(), tests=tests, fit=BlendFit(0.25, "fine_tuned"))  # no options
    assert (chosen.kind, chosen.rule) == ("fine_tuned", "paired_test_switched") and "< 0.0667" in chosen.reason
    # two blends pass (p 0.02 and 0.01): the better validation score is served, with its own weight and partner
    two = pick(CLS, scores, y, PersonalConfig(), tests=tests, fit=fit([0.02, 0.01, 0.5, 0.6, 0.7, 0.8], sc))
    assert (two.kind, two.weight, two.blend_of, two.p, two.validation_metric) == (
        "blend",
        0.25,
        "fine_tuned",
        0.02,
        0.93,
    )
    # fine-tuned passes too (0.024 < 0.025) and scores above both: it is served
    ft = pick(CLS, scores, y, PersonalConfig(), tests={**tests, "fine_tuned": _ev(0.024)}, fit=fit([0.02] * 6, sc))
    assert (ft.kind, ft.weight, ft.p) == ("fine_tuned", None, 0.024)
    assert PersonalConfig().blend_tests == "each"
    with pytest.raises(ValueError, match="blend_tests"):
        PersonalConfig(blend_tests="all").validate()  # type: ignore[arg-type]


def test_personaliser_serves_a_blend_whose_predictions_are_the_weighted_mean_of_its_parts():
    """Two halves of a plant's feature space: local-only learnt one, the federation model the other, each
    ranks the rows well but differently; the served blend's scores equal w * local + (1 - w) * partner."""
    from edge.personal import Personaliser, predict

    rng = np.random.default_rng(5)
    cfg = PersonalConfig(local_epochs=15, finetune_epochs=0, min_validation_rows=30, min_validation_positives=8)

    def rows(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.uniform(0, 1, (n, 3)).astype(np.float32)
        y = ((x[:, 0] + x[:, 1] + 0.3 * rng.normal(size=n)) > 1.0).astype(np.float32).reshape(-1, 1)
        return x, y

    x, y = rows(400)
    x2, y2 = rows(400)
    glob = train_local_only(CLS, x2[:, [1, 0, 2]] * [1, 0.2, 1], y2, cfg)  # another plant's, partly off
    xv, yv = rows(600)
    p = Personaliser(cfg, CLS)
    served, choice = p.choose(glob, x, y, xv, yv)
    assert set(choice.candidates) == {"local", "global", "fine_tuned", "blend"}
    assert choice.candidates["blend"] is not None and math.isfinite(choice.candidates["blend"])
    # whatever was picked, the served prediction is what the choice names
    parts = {"local": p.local, "global": glob}
    if choice.kind == "blend":
        assert choice.weight in cfg.blend_weights and choice.blend_of in ("global", "fine_tuned")
        partner = parts.get(choice.blend_of)
        if partner is not None:
            want = choice.weight * predict(CLS, p.local, xv) + (1 - choice.weight) * predict(CLS, partner, xv)
            assert served.predict(CLS, xv) == pytest.approx(want, abs=1e-6)
    else:
        assert len(served.parts) == 1
    blend_only = Choice("blend", "roc_auc", None, weight=0.5, blend_of="global")
    halves = served_of({"local": p.local, "global": glob, "fine_tuned": glob}, blend_only)
    want = 0.5 * predict(CLS, p.local, xv) + 0.5 * predict(CLS, glob, xv)
    assert halves.predict(CLS, xv) == pytest.approx(want, abs=1e-6)


def test_the_fold_blend_mixes_in_the_fine_tuned_model_even_where_the_pool_scores_the_global_better():
    """Worked by hand: 2 failures, 2 normal rows. The global model orders them perfectly (AUC 1: the pool
    flatters it, it trained on these rows), the fine-tuned one puts f1 below n1 (AUC 3/4), local-only is
    0.2, 0.9 / 0.1, 0.6 (AUC 3/4). The partner is the one named (``fold_blend_of``), not the pool's best; with
    "best" it is the global model. The blend 0.75 x local + 0.25 x fine-tuned scores 0.3, 0.875 / 0.25, 0.5: f1
    below n2, AUC 3/4."""
    from edge.personal import compare

    y = np.array([1.0, 1.0, 0.0, 0.0])
    preds = {
        "local": np.array([0.2, 0.9, 0.1, 0.6]),
        "global": np.array([0.9, 0.8, 0.1, 0.2]),
        "fine_tuned": np.array([0.6, 0.8, 0.7, 0.2]),
    }
    scores, _, fit = compare(CLS, y, preds, None, (0.75,), "fine_tuned")
    assert scores["global"] == 1.0 and scores["fine_tuned"] == 0.75 and fit == BlendFit(0.75, "fine_tuned")
    assert scores["blend"] == pytest.approx(0.75)
    _, _, fit_best = compare(CLS, y, preds, None, (0.75,))
    assert fit_best == BlendFit(0.75, "global")
    # a partner that could not be scored falls back to the best that could
    no_ft = {k: v for k, v in preds.items() if k != "fine_tuned"}
    assert compare(CLS, y, no_ft, None, (0.75,), "fine_tuned")[2] == BlendFit(0.75, "global")
    assert PersonalConfig().fold_blend_of == "by_task"
    with pytest.raises(ValueError, match="fold_blend_of"):
        PersonalConfig(fold_blend_of="mean").validate()  # type: ignore[arg-type]


def test_by_task_the_fold_blend_of_a_log_odds_classifier_mixes_in_the_global_model():
    """Worked by hand on log-odds (what a classifier's fold pool holds with ``blend_space = "log_odds"``):
    failures f1, f2 and normal rows n1, n2. Local-only 0, 4 / -1, 0.5 puts f1 below n2 (AUC 3/4); the global
    model 3, 2 / -2, -1 (AUC 1); the fine-tuned -1, 2 / 1.5, 1 (AUC 2/4). By task the classifier's partner is
    the global model: 0.75 x local + 0.25 x global = 0.75, 3.5 / -1.25, 0.125, every failure above every normal
    row, AUC 1. The fine-tuned partner (regression's, or a probability blend's) gives -0.25, 3.5 / -0.375, 0.625:
    f1 still below n2, AUC 3/4, no better than local-only."""
    from edge.personal import compare, fold_partner

    assert fold_partner(CLS, PersonalConfig()) == "global"
    assert fold_partner(REG, PersonalConfig()) == "fine_tuned"
    assert fold_partner(CLS, PersonalConfig(blend_space="probability")) == "fine_tuned"
    assert fold_partner(REG, PersonalConfig(fold_blend_of="global")) == "global"
    assert fold_partner(CLS, PersonalConfig(fold_blend_of="fine_tuned")) == "fine_tuned"
    assert fold_partner(CLS, PersonalConfig(fold_blend_of="best")) is None
    y = np.array([1.0, 1.0, 0.0, 0.0])
    logits = {
        "local": np.array([0.0, 4.0, -1.0, 0.5]),
        "global": np.array([3.0, 2.0, -2.0, -1.0]),
        "fine_tuned": np.array([-1.0, 2.0, 1.5, 1.0]),
    }
    scores, _, fit = compare(CLS, y, logits, None, (0.75,), fold_partner(CLS, PersonalConfig()))
    assert scores["local"] == 0.75 and scores["fine_tuned"] == 0.5 and fit == BlendFit(0.75, "global")
    assert scores["blend"] == 1.0
    scores_ft, _, fit_ft = compare(CLS, y, logits, None, (0.75,), "fine_tuned")
    assert fit_ft == BlendFit(0.75, "fine_tuned") and scores_ft["blend"] == pytest.approx(0.75)
