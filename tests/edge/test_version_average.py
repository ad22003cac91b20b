"""The mean of the last few global versions a site adopted (edge/version_average.py), and its use by the pick."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edge.personal import PersonalConfig, Personaliser, fine_tune
from edge.version_average import VersionAverage
from models.spec import ModelSpec

CLS = ModelSpec(kind="mlp", n_features=2, hidden=[4], task="classification")


def test_the_mean_is_over_the_last_k_versions_worked_by_hand():
    """Versions 1..4 with w = 1, 2, 4, 8 and b = [0, 3], [3, 6], ...: over the last three, w = (2 + 4 + 8) / 3."""
    avg = VersionAverage(3)
    for v, (w, b) in enumerate([(1.0, [0.0, 3.0]), (2.0, [3.0, 6.0]), (4.0, [6.0, 0.0]), (8.0, [9.0, 3.0])], 1):
        avg.add(v, {"w": np.array([[w]], np.float32), "b": np.array(b, np.float32)})
    m = avg.mean()
    assert avg.versions == [2, 3, 4]
    assert m["w"][0, 0] == pytest.approx(14 / 3)
    np.testing.assert_allclose(m["b"], [6.0, 3.0])  # (3 + 6 + 9) / 3, (6 + 0 + 3) / 3
    assert m["w"].dtype == np.float32


def test_a_version_added_again_or_older_is_ignored_and_a_new_shape_starts_afresh():
    avg = VersionAverage(5)
    avg.add(7, {"w": np.array([2.0])})
    avg.add(7, {"w": np.array([100.0])})  # the same version exported twice
    avg.add(6, {"w": np.array([100.0])})  # an older one (never adopted backwards)
    avg.add(8, {"w": np.array([4.0])})
    assert avg.versions == [7, 8] and avg.mean()["w"][0] == pytest.approx(3.0)
    avg.add(9, {"w": np.array([1.0, 1.0])})  # another model's shape: the old versions do not mix in
    assert avg.versions == [9]
    np.testing.assert_allclose(avg.mean()["w"], [1.0, 1.0])
    with pytest.raises(ValueError, match="last >= 1"):
        VersionAverage(0)
    with pytest.raises(ValueError, match="no version"):
        VersionAverage(2).mean()


def test_bad_personal_settings_are_named():
    with pytest.raises(ValueError, match="average_versions and finetune_repeats"):
        PersonalConfig(average_versions=0).validate()
    with pytest.raises(ValueError, match="average_versions and finetune_repeats"):
        PersonalConfig(finetune_repeats=0).validate()
    with pytest.raises(ValueError, match="average_for"):
        PersonalConfig(average_for="all").validate()  # type: ignore[arg-type]


def _rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2)).astype(np.float32)
    return x, (x[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(np.float32).reshape(-1, 1)


def _params(seed: int) -> dict[str, np.ndarray]:
    """Two models that rank rows differently: version 0 of two model seeds."""
    from models import build_model
    from models.flat import shared_state

    return shared_state(build_model(CLS, seed=seed), CLS)


def test_the_fine_tune_starts_from_the_average_and_with_both_the_global_candidate_is_the_average():
    """2 versions, no fine-tune epochs (the fine-tune is its start): scores are those of (v1 + v2) / 2 exactly."""
    from edge.personal import predict
    from models.metrics import score

    x, y = _rows(60, 0)
    xv, yv = _rows(60, 1)
    v1, v2 = _params(1), _params(2)
    mean = {k: (v1[k] + v2[k]) / 2 for k in v1}
    auc = {name: score("roc_auc", yv[:, 0], predict(CLS, m, xv)) for name, m in [("v2", v2), ("mean", mean)]}
    assert auc["v2"] != pytest.approx(auc["mean"], abs=1e-3)  # the two are told apart
    cfg = PersonalConfig(serve="pick", finetune_epochs=0, local_epochs=2, average_versions=2, min_validation_rows=1)
    for average_for, global_is in [("fine_tune", "v2"), ("both", "mean")]:
        p = Personaliser(replace(cfg, average_for=average_for), CLS)  # type: ignore[arg-type]
        p.choose(v1, x, y, xv, yv, version=1)
        _, choice = p.choose(v2, x, y, xv, yv, version=2)
        assert p.versions is not None and p.versions.versions == [1, 2]
        assert choice.candidates["fine_tuned"] == pytest.approx(auc["mean"], abs=1e-4)
        assert choice.candidates["global"] == pytest.approx(auc[global_is], abs=1e-4)
    np.testing.assert_array_equal(v2["body.0.weight"], _params(2)["body.0.weight"])  # the input is not changed
    # without a version number (or average_versions = 1) the newest model is used alone
    _, c = Personaliser(cfg, CLS).choose(v2, x, y, xv, yv)
    assert c.candidates["fine_tuned"] == pytest.approx(auc["v2"], abs=1e-4)


def test_repeated_fine_tunes_are_averaged_weight_by_weight(monkeypatch):
    """Three fine-tunes returning w = 1, 2 and 6: the candidate's w is their mean, 3 (float32)."""
    import edge.personal as personal

    made = iter([1.0, 2.0, 6.0])
    monkeypatch.setattr(personal, "_train", lambda *a, **k: {"w": np.array([next(made), 0.5], np.float64)})
    out = fine_tune(CLS, {"w": np.zeros(2)}, np.zeros((4, 2)), None, PersonalConfig(finetune_repeats=3))
    np.testing.assert_allclose(out["w"], [3.0, 0.5])
    assert out["w"].dtype == np.float32


def test_repeated_fine_tunes_train_from_the_start_on_their_own_shuffles():
    x, y = _rows(64, 2)
    start = _params(1)
    out = fine_tune(CLS, start, x, y, PersonalConfig(finetune_epochs=1, finetune_lr=0.05, finetune_repeats=3))
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in start.items()}
    assert sum(float(np.abs(out[k] - start[k]).sum()) for k in start) > 0  # it trained


def test_the_edges_path_passes_the_version_and_the_choice_names_the_versions_averaged(tmp_path):
    """choose_from (what edge/line_export.py calls with the adopted version): versions 1 and 2 are averaged and
    the line's model file (Choice.to_dict, current.json's served) lists them; version 0 never joins."""
    from edge.dataset import Dataset

    x, y = _rows(80, 3)
    ds = Dataset(tmp_path / "rows.sqlite", (2,), 1, max_rows=1000, holdout_fraction=0.25, split="random")
    ds.add_many(list(zip(x, y, strict=True)))
    p = Personaliser(PersonalConfig(serve="pick", finetune_epochs=0, local_epochs=1, average_versions=3), CLS)
    _, c0 = p.choose_from(ds, _params(1), 0)
    assert c0.averaged_versions is None  # the untrained version 0 alone: nothing to average
    p.choose_from(ds, _params(1), 1)
    _, c2 = p.choose_from(ds, _params(2), 2)
    assert c2.averaged_versions == [1, 2] and c2.to_dict()["averaged_versions"] == [1, 2]
    ds.close()
