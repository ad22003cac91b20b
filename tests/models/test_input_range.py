"""The model's own input range (issue 14's defence in depth): ``input_low`` / ``input_high`` saturate every
input before the first layer, in torch and in the exported ONNX, whatever the line's ``[rows] clip``."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fedline.config import ConfigError, parse
from models import ModelSpec, build_model, export_onnx, loss_per_sample

# three features in the rows' units (an engineering range arrives as [0, 1]), the third one standardised
RANGED = ModelSpec(
    kind="mlp",
    n_features=3,
    hidden=[8],
    input_mean=[0.5, 0.5, 10.0],
    input_scale=[0.25, 0.25, 2.0],
    input_low=[0.0, 0.0, 4.0],
    input_high=[1.0, 1.0, 16.0],
)


def _onnx(spec: ModelSpec, seed: int = 5) -> tuple[torch.nn.Module, ort.InferenceSession]:
    model = build_model(spec, seed=seed).eval()
    return model, ort.InferenceSession(export_onnx(model, spec), providers=["CPUExecutionProvider"])


def test_onnx_runtime_scores_an_out_of_range_reading_as_the_range_edge() -> None:
    """A 6 σ-style trigger (air temperature 1.7 in range units, 312 K of a [295, 305] K range) scores exactly
    as the range's top (1.0, 305 K); below the range as its bottom; inside the range nothing changes."""
    _, session = _onnx(RANGED)
    rows = np.array(
        [
            [1.7, 0.3, 11.0],  # first feature above its range ...
            [1.0, 0.3, 11.0],  # ... scores as its top
            [-3.0, 0.3, 30.0],  # first below, third above
            [0.0, 0.3, 16.0],  # ... scores as low / high
            [0.6, 0.3, 11.0],  # inside: not the edge
        ],
        np.float32,
    )
    (y,) = session.run(["y"], {"x": rows})
    assert y[0, 0] == y[1, 0]
    assert y[2, 0] == y[3, 0]
    assert y[4, 0] != y[1, 0]


def test_torch_model_saturates_by_hand_and_without_a_range_does_not() -> None:
    """The first layer sees ``(clamp(x) − mean) / scale``: for x = [1.7, −0.2, 20] that is
    [(1 − 0.5)/0.25, (0 − 0.5)/0.25, (16 − 10)/2] = [2, −2, 3], worked by hand; without a declared range
    (x inside the default six spreads of the standardisation, the next test) it sees
    [(1.7 − 0.5)/0.25, (−0.2 − 0.5)/0.25, (20 − 10)/2] = [4.8, −2.8, 5]."""
    x = torch.tensor([[1.7, -0.2, 20.0]])
    model = build_model(RANGED, seed=1)
    np.testing.assert_allclose(model.norm(x).numpy(), [[2.0, -2.0, 3.0]], rtol=1e-6)
    plain = ModelSpec(kind="mlp", n_features=3, hidden=[8], input_mean=[0.5, 0.5, 10.0], input_scale=[0.25, 0.25, 2.0])
    np.testing.assert_allclose(build_model(plain, seed=1).norm(x).numpy(), [[4.8, -2.8, 5.0]], rtol=1e-6)
    # same weights with and without the range: equal scores inside it
    inside = torch.tensor([[0.2, 0.9, 5.0]])
    with torch.no_grad():
        assert torch.equal(build_model(RANGED, seed=1)(inside), build_model(plain, seed=1)(inside))


def test_autoencoder_target_is_not_saturated() -> None:
    """The encoder sees the clamped reading, the reconstruction target does not: an out-of-range reading
    scores a larger anomaly than the range's edge (its error includes the distance beyond the edge)."""
    spec = ModelSpec(
        kind="autoencoder", n_features=2, hidden=[4, 2], task="anomaly", input_low=[0.0, 0.0], input_high=[1.0, 1.0]
    )
    model = build_model(spec, seed=2).eval()
    with torch.no_grad():
        edge, beyond = loss_per_sample(model, spec, torch.tensor([[1.0, 0.5], [5.0, 0.5]]), None)
    assert float(beyond) > float(edge) + 1.0  # (5 − 1)² / 2 = 8 more, less what the reconstruction gives back


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"input_low": [0.0, 0.0, 0.0]}, "go together"),
        ({"input_low": [0.0], "input_high": [1.0]}, "n_features"),
        ({"input_low": [0.0, 1.0, 0.0], "input_high": [1.0, 1.0, 1.0]}, "feature(s) [1]"),
        ({"input_low": [0.0, 0.0, float("nan")], "input_high": [1.0, 1.0, 1.0]}, "finite"),
    ],
)
def test_bad_input_range_names_the_problem(extra: dict, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(ModelSpec, {"kind": "mlp", "n_features": 3, **extra}, file="site.toml", where="model")
    assert words in info.value.message


def test_compose_federation_declares_one_input_range_everywhere() -> None:
    """The compose deployment's aggregator and its three sites declare the same ``[model]`` with the
    engineering ranges' [0, 1] as the input range: an edge refuses a manifest whose spec differs from its own."""
    from pathlib import Path

    from fedline.config import load_toml

    root = Path(__file__).resolve().parents[2] / "deploy" / "compose"
    specs = {
        p.relative_to(root).as_posix(): ModelSpec.from_dict(load_toml(p)["model"])
        for p in [root / "aggregator.toml", *sorted(root.glob("sites/*/site.toml"))]
    }
    assert len(specs) == 4, specs
    first = next(iter(specs.values()))
    assert all(s == first for s in specs.values()), specs
    assert first.input_low == [0.0] * 5 and first.input_high == [1.0] * 5


def test_a_standardised_model_without_a_declared_range_saturates_six_spreads_out() -> None:
    """No input_low / input_high, standardisation mean (0.5, 0.5, 10), scale (0.25, 0.25, 2): the default range
    is mean ± 6 scale = [−1, 2], [−1, 2], [−2, 22] (worked by hand). x = (3, −2, 30) is clamped to (2, −1, 22)
    and standardised to (6, −6, 6); x = (1.7, −0.2, 20) is inside and gives (4.8, −2.8, 5). ONNX Runtime on the
    export scores (3, −2, 30) exactly as (2, −1, 22). A declared range takes precedence; no standardisation, no
    range: nothing is clamped."""
    plain = ModelSpec(kind="mlp", n_features=3, hidden=[8], input_mean=[0.5, 0.5, 10.0], input_scale=[0.25, 0.25, 2.0])
    assert plain.saturation() == ([-1.0, -1.0, -2.0], [2.0, 2.0, 22.0])
    model = build_model(plain, seed=1)
    np.testing.assert_allclose(
        model.norm(torch.tensor([[3.0, -2.0, 30.0], [1.7, -0.2, 20.0]])).numpy(),
        [[6.0, -6.0, 6.0], [4.8, -2.8, 5.0]],
        rtol=1e-6,
    )
    _, session = _onnx(plain)
    (y,) = session.run(["y"], {"x": np.array([[3.0, -2.0, 30.0], [2.0, -1.0, 22.0]], np.float32)})
    assert y[0, 0] == y[1, 0]
    assert RANGED.saturation() == ([0.0, 0.0, 4.0], [1.0, 1.0, 16.0])
    assert ModelSpec(kind="mlp", n_features=3, hidden=[8]).saturation() == ([], [])
    bare = build_model(ModelSpec(kind="mlp", n_features=3, hidden=[8]), seed=1)
    np.testing.assert_allclose(bare.norm(torch.tensor([[300.0, -50.0, 1e4]])).numpy(), [[300.0, -50.0, 1e4]])


def test_the_demo_declares_its_input_range() -> None:
    """The demo's [rows] give every feature an engineering range, so its rows arrive in [0, 1]; its [model]
    (one table for the aggregator and every site) declares exactly that as the input range."""
    from fedline.demo.data import load_demo_data
    from fedline.demo.workspace import Tuning, model_table, rows_table

    data = load_demo_data(max_rows_per_site=50)
    n = len(data.features)
    assert all(len(f["range"]) == 2 for f in rows_table(data)["features"])
    spec = ModelSpec.from_dict(model_table(data, Tuning()))
    assert spec.input_low == [0.0] * n and spec.input_high == [1.0] * n
    assert spec.saturation() == ([0.0] * n, [1.0] * n)
