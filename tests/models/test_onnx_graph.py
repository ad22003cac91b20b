"""models.onnx_graph: the ONNX written from the weights is torch's export (byte for byte where torch does not
merge equal tensors) and scores the same in onnxruntime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edge.inference.onnx_params import onnx_params
from models import ModelSpec, ModelStateError, build_model, export_onnx
from models.onnx_graph import build_onnx, covers

ROOT = Path(__file__).resolve().parents[2]

# specs whose tensors never coincide: torch's export is the same model byte for byte
SAME_BYTES = {
    "mlp-demo": ModelSpec(
        kind="mlp",
        n_features=5,
        hidden=[32, 32],
        input_mean=[300, 310, 1500, 40, 100],
        input_scale=[2, 1.5, 180, 10, 60],
    ),
    "mlp-no-standardisation": ModelSpec(kind="mlp", n_features=3, hidden=[4]),
    "mlp-regression-window-range": ModelSpec(
        kind="mlp",
        n_features=4,
        hidden=[8, 6],
        window=3,
        n_outputs=2,
        task="regression",
        personal=["head."],
        input_low=[-1, -2, -3, -4],
        input_high=[1, 2, 3, 4],
    ),
    "autoencoder-saturating": ModelSpec(
        kind="autoencoder", task="anomaly", n_features=3, hidden=[4, 2], input_mean=[1, 2, 3], input_scale=[1, 0.5, 2]
    ),
    "autoencoder-plain": ModelSpec(kind="autoencoder", task="anomaly", n_features=7, hidden=[16, 8, 3]),
}
# torch's exporter merges initializers of equal value (low == mean, high == scale here) into Identity nodes
MERGED = ModelSpec(
    kind="mlp", n_features=3, hidden=[4, 2], task="regression", window=3, input_low=[0, 0, 0], input_high=[1, 1, 1]
)


def _trained(spec: ModelSpec, seed: int) -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
    """A model moved away from its initialisation (as a later version is), and its parameters as arrays."""
    model = build_model(spec, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model, {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


def _scores(blob: bytes, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _inputs(spec: ModelSpec, rng: np.random.Generator, n: int = 256) -> np.ndarray:
    centre = np.array(spec.input_mean or [0.0] * spec.n_features, np.float32)
    spread = np.array(spec.input_scale or [1.0] * spec.n_features, np.float32)
    # up to 12 spreads out: past the default saturation at 6, so the clamps are exercised too
    z = rng.normal(0, 4, size=(n, *spec.input_shape)).astype(np.float32)
    return (centre + z * spread).astype(np.float32)


@pytest.mark.parametrize("name", SAME_BYTES)
def test_the_model_is_torchs_export_byte_for_byte(name: str) -> None:
    spec = SAME_BYTES[name]
    for seed in (0, 5):
        model, params = _trained(spec, seed)
        theirs = onnx.load_from_string(export_onnx(model, spec))
        ours = onnx.load_from_string(build_onnx(spec, params))
        assert ours.producer_name == "fedline"
        ours.producer_name, ours.producer_version = theirs.producer_name, theirs.producer_version
        assert ours.SerializeToString() == theirs.SerializeToString(), name


@pytest.mark.parametrize("spec", [*SAME_BYTES.values(), MERGED], ids=[*SAME_BYTES, "merged"])
def test_onnxruntime_scores_as_torchs_export(spec: ModelSpec) -> None:
    rng = np.random.default_rng(3)
    model, params = _trained(spec, 2)
    blob = build_onnx(spec, params)
    onnx.checker.check_model(onnx.load_from_string(blob), full_check=True)
    x = _inputs(spec, rng)
    ours, theirs = _scores(blob, x), _scores(export_onnx(model, spec), x)
    assert ours.shape == (len(x), spec.n_outputs) and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() <= 1e-6 * max(1.0, float(np.abs(theirs).max()))
    # and both are the torch model's score
    from models import Scorer

    with torch.no_grad():
        want = Scorer(model, spec).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)
    assert len(_scores(blob, x[:1])) == 1  # the batch axis is dynamic


def test_equal_tensors_keep_their_own_names() -> None:
    """Where torch merges equal tensors, the written graph keeps each: its layout does not depend on values."""
    _, params = _trained(MERGED, 0)
    keys = set(onnx_params(build_onnx(MERGED, params)))
    assert {"graph/model.norm.low", "graph/model.norm.high", "graph/model.norm.mean"} <= keys
    other = ModelSpec(**{**MERGED.to_dict(), "input_low": [0.5, 0, 0]})
    assert set(onnx_params(build_onnx(other, params))) == keys


def test_wrong_parameters_and_other_kinds_are_refused() -> None:
    spec = SAME_BYTES["mlp-demo"]
    _, params = _trained(spec, 0)
    with pytest.raises(ModelStateError, match="do not match"):
        build_onnx(spec, {n: a for n, a in params.items() if n != "head.bias"})
    with pytest.raises(ModelStateError, match="shape"):
        build_onnx(spec, {**params, "head.weight": np.zeros((1, 31), np.float32)})
    for kind in ("cnn1d", "gru"):
        other = ModelSpec(kind=kind, n_features=3, hidden=[4], window=8)  # type: ignore[arg-type]
        assert not covers(other)
        with pytest.raises(ValueError, match="export it with models.export"):
            build_onnx(other, params)
    assert covers(spec) and covers(SAME_BYTES["autoencoder-plain"])


def test_writing_the_onnx_imports_no_torch() -> None:
    code = f"""
import json, sys
from models import ModelSpec
from models.onnx_graph import build_onnx
from models.seed_init import seed_params
spec = ModelSpec.from_dict({json.dumps(SAME_BYTES["mlp-demo"].to_dict())})
blob = build_onnx(spec, seed_params(spec, 0))
print(json.dumps({{"torch": "torch" in sys.modules, "onnx": "onnx" in sys.modules, "bytes": len(blob)}}))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["torch"] is False and got["onnx"] is True and got["bytes"] > 1281 * 4
