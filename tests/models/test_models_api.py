"""models/: spec parsing, deterministic build, flat views, personal split, ONNX parity."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fedline.config import ConfigError, parse
from models import (
    ModelSpec,
    ModelStateError,
    build_model,
    export_onnx,
    load_shared_state,
    loss_per_sample,
    personal_state,
    shared_state,
    split_names,
)

SPECS = {
    "mlp-classification": ModelSpec(
        kind="mlp",
        n_features=5,
        hidden=[16, 8],
        personal=["head."],
        input_mean=[300, 310, 1500, 40, 100],
        input_scale=[2, 1.5, 180, 10, 60],
    ),
    "mlp-regression-window": ModelSpec(kind="mlp", n_features=3, hidden=[8], task="regression", window=4, n_outputs=2),
    "cnn1d": ModelSpec(kind="cnn1d", n_features=3, hidden=[8, 8], window=16, personal=["head."]),
    "gru": ModelSpec(kind="gru", n_features=4, hidden=[8, 6], window=10, task="regression"),
    "autoencoder": ModelSpec(kind="autoencoder", n_features=6, hidden=[8, 3], task="anomaly", personal=["head."]),
}


def test_spec_round_trips_through_manifest_json() -> None:
    import json

    for spec in SPECS.values():
        assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize(
    "table, key, words",
    [
        ({"kind": "rnn", "n_features": 3}, "model.kind", "one of"),
        ({"kind": "mlp", "n_features": 3, "hiden": [4]}, "model.hiden", "unknown key"),
        ({"kind": "autoencoder", "n_features": 3}, "model", "anomaly"),
        ({"kind": "gru", "n_features": 3}, "model", "window"),
        ({"kind": "mlp", "n_features": 3, "input_mean": [1.0]}, "model", "input_mean"),
        ({"kind": "mlp", "n_features": 0}, "model", "n_features"),
    ],
)
def test_bad_spec_names_the_key(table: dict, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(ModelSpec, table, file="site.toml", where="model")
    assert info.value.file == "site.toml"
    assert info.value.key == key
    assert words in info.value.message


def test_importing_spec_does_not_import_torch() -> None:
    code = "import sys, models; s = models.ModelSpec(kind='mlp', n_features=2); assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", SPECS)
def test_build_is_deterministic_per_seed(name: str) -> None:
    spec = SPECS[name]
    a, b, c = build_model(spec, seed=3), build_model(spec, seed=3), build_model(spec, seed=4)
    sa, sb, sc = shared_state(a, spec), shared_state(b, spec), shared_state(c, spec)
    assert list(sa) == list(sb)
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert any(not np.array_equal(sa[k], sc[k]) for k in sa)
    assert all(v.dtype == np.float32 for v in sa.values())


def test_personal_split_keeps_head_out_of_shared_state() -> None:
    spec = SPECS["mlp-classification"]
    model = build_model(spec)
    shared, personal = split_names(spec, model)
    assert personal == ["head.weight", "head.bias"]
    assert shared and all(n.startswith("body.") for n in shared)
    assert list(shared_state(model, spec)) == shared
    assert list(personal_state(model, spec)) == personal


def test_personal_prefix_that_matches_nothing_is_refused() -> None:
    spec = ModelSpec(kind="mlp", n_features=3, personal=["heads."])
    with pytest.raises(ModelStateError, match="heads"):
        split_names(spec, build_model(spec))


def test_load_shared_state_is_strict_and_loads() -> None:
    spec = SPECS["cnn1d"]
    src, dst = build_model(spec, seed=1), build_model(spec, seed=2)
    state = shared_state(src, spec)
    load_shared_state(dst, spec, state)
    after = shared_state(dst, spec)
    assert all(np.array_equal(state[k], after[k]) for k in state)
    name = next(iter(state))
    with pytest.raises(ModelStateError, match="shape"):
        load_shared_state(dst, spec, {**state, name: np.zeros((1, 2), np.float32)})
    with pytest.raises(ModelStateError, match="missing"):
        load_shared_state(dst, spec, {k: v for k, v in state.items() if k != name})
    with pytest.raises(ModelStateError, match="unexpected"):
        load_shared_state(dst, spec, {**state, "head.weight": np.zeros((1, 8), np.float32)})


@pytest.mark.parametrize("name", SPECS)
def test_onnxruntime_agrees_with_torch(name: str) -> None:
    """ONNX Runtime and torch agree to 1e-5 for every kind, at several batch sizes."""
    from models.nets import Scorer

    spec = SPECS[name]
    model = build_model(spec, seed=7).eval()
    session = ort.InferenceSession(export_onnx(model, spec), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    assert [o.name for o in session.get_outputs()] == ["y"]
    rng = np.random.default_rng(0)
    mean = np.array(spec.input_mean or [0.0] * spec.n_features, np.float32)
    scale = np.array(spec.input_scale or [1.0] * spec.n_features, np.float32)
    for batch in (1, 7, 64):
        x = (rng.standard_normal((batch, *spec.input_shape)) * scale + mean).astype(np.float32)
        (y_onnx,) = session.run(["y"], {"x": x})
        with torch.no_grad():
            y_torch = Scorer(model, spec)(torch.from_numpy(x)).numpy()
        assert y_onnx.shape == (batch, spec.n_outputs)
        np.testing.assert_allclose(y_onnx, y_torch, atol=1e-5, rtol=1e-5)
    if spec.task == "classification":
        assert ((y_onnx >= 0) & (y_onnx <= 1)).all()
    if spec.task == "anomaly":
        assert (y_onnx >= 0).all()


@pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing")
@pytest.mark.parametrize("name", SPECS)
def test_every_model_trains_under_opacus(name: str) -> None:
    """Opacus accepts every kind and one DP-SGD step changes the shared weights."""
    from opacus import PrivacyEngine

    spec = SPECS[name]
    model = build_model(spec)
    before = shared_state(model, spec)
    x = torch.randn(32, *spec.input_shape)
    y = torch.randint(0, 2, (32, spec.n_outputs)).float()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    pmodel, popt, ploader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
    )
    for xb, yb in ploader:
        if len(xb) == 0:
            continue
        popt.zero_grad()
        loss_per_sample(pmodel, spec, xb, yb).mean().backward()
        popt.step()
        break
    after = shared_state(pmodel, spec)
    assert list(after) == list(before)
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_export_warnings_are_logged_not_hidden(caplog: pytest.LogCaptureFixture) -> None:
    """The exporter's deprecation is logged once per process; no other warning escapes an export of any kind;
    a warning the export does not know about is raised, not swallowed."""
    import warnings

    from models import export as export_mod

    export_mod._deprecation_logged = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # anything an export lets through fails the test
        for spec in SPECS.values():
            export_onnx(build_model(spec, seed=0), spec)
    logged = [r for r in caplog.records if r.getMessage() == "onnx.exporter_deprecated"]
    assert len(logged) == 1 and "TorchScript" in logged[0].fields["detail"]  # type: ignore[attr-defined]

    other = warnings.WarningMessage(UserWarning("something new"), UserWarning, "x.py", 1)
    with pytest.warns(UserWarning, match="something new"):
        export_mod._route([other])
