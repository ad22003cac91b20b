"""Building, probing and canary-checking candidate models with real onnxruntime (no broker)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from broker_bridge.envelope import content_hash
from broker_bridge.errors import ModelRefused
from edge.inference.config import ConfigError
from edge.inference.model_dir import POINTER, ModelDirError, publish_model, read_model, read_pointer
from edge.inference.session import ModelInfo, build_model, canary_check, canary_loss
from tests.inference.conftest import N_FEATURES, TRUE_B, TRUE_W, make_config
from tests.inference.onnx_models import linear_onnx, linear_score, mlp_onnx, nan_onnx


def info(v: int = 1, blob: bytes = b"") -> ModelInfo:
    return ModelInfo(v, content_hash(blob), "model_dir")


def test_good_model_scores_like_numpy() -> None:
    blob = linear_onnx(TRUE_W, TRUE_B)
    model = build_model(blob, info(3, blob), (N_FEATURES,))
    x = np.random.default_rng(1).uniform(size=(50, N_FEATURES)).astype(np.float32)
    assert model.version == 3
    np.testing.assert_allclose(model.score(x), linear_score(TRUE_W, TRUE_B, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "case, reason",
    [
        ("truncated", "load"),
        ("garbage", "load"),
        ("wrong_width", "width"),
        ("nan_scores", "probe"),
        ("two_outputs", "probe"),
    ],
)
def test_unusable_models_are_refused_with_a_reason(case: str, reason: str) -> None:
    good = linear_onnx(TRUE_W, TRUE_B)
    blob = {
        "truncated": good[: len(good) // 2],
        "garbage": b"\x00not an onnx model" * 10,
        "wrong_width": linear_onnx(np.ones(N_FEATURES - 1)),
        "nan_scores": nan_onnx(N_FEATURES),
        "two_outputs": mlp_onnx([np.ones((N_FEATURES, 2))], [np.zeros(2)]),
    }[case]
    with pytest.raises(ModelRefused) as exc:
        build_model(blob, info(2, blob), (N_FEATURES,))
    assert exc.value.reason == reason
    assert "version 2" in exc.value.detail


def test_model_exported_by_models_package_passes_the_probe() -> None:
    """The real exporter's output (torch, in this test process only) is what the line loads."""
    from models import ModelSpec, export_onnx
    from models import build_model as build_torch

    spec = ModelSpec(kind="mlp", n_features=N_FEATURES, hidden=[8, 4])
    blob = export_onnx(build_torch(spec, seed=0), spec)
    model = build_model(blob, info(1, blob), (N_FEATURES,))
    scores = model.score(np.full((7, N_FEATURES), 0.3, np.float32))
    assert scores.shape == (7,) and np.all((scores > 0) & (scores < 1))
    win = ModelSpec(kind="gru", n_features=3, hidden=[4], window=5)
    blob = export_onnx(build_torch(win, seed=0), win)
    assert build_model(blob, info(1, blob), (5, 3)).score(np.zeros((2, 5, 3), np.float32)).shape == (2,)
    with pytest.raises(ModelRefused) as exc:
        build_model(blob, info(1, blob), (6, 3))
    assert exc.value.reason == "width"


def test_canary_keeps_the_better_model() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(200, N_FEATURES)).astype(np.float32)
    y = (x @ TRUE_W + TRUE_B > 0).astype(np.float64)
    good_blob, bad_blob, close_blob = (
        linear_onnx(TRUE_W * 3, TRUE_B * 3),
        linear_onnx(-TRUE_W * 3, -TRUE_B * 3),
        linear_onnx(TRUE_W * 2.9, TRUE_B * 2.9),
    )
    good = build_model(good_blob, info(1, good_blob), (N_FEATURES,))
    bad = build_model(bad_blob, info(2, bad_blob), (N_FEATURES,))
    close = build_model(close_blob, info(3, close_blob), (N_FEATURES,))
    assert canary_loss(good.score(x), y, "classification") < canary_loss(bad.score(x), y, "classification")
    with pytest.raises(ModelRefused) as exc:
        canary_check(bad, good, x, y, "classification", margin=0.05)
    assert exc.value.reason == "canary"
    result = canary_check(close, good, x, y, "classification", margin=0.05)
    assert result.rows == 200 and result.new_loss <= result.old_loss + 0.05
    assert canary_loss(np.array([0.5, 1.5]), np.array([0.5, 1.0]), "regression") == pytest.approx(0.125)


def test_model_dir_round_trip_and_bad_pointer(tmp_path) -> None:
    assert read_pointer(tmp_path) is None
    blobs = [linear_onnx(TRUE_W * k) for k in (1, 2, 3, 4)]
    for v, b in enumerate(blobs, start=1):
        ptr = publish_model(tmp_path, b, v, keep=2, base_version=v - 1)
    got = read_pointer(tmp_path)
    assert got == ptr and got.version == 4 and got.meta == {"base_version": 3}
    assert read_model(tmp_path, got) == blobs[-1]
    assert len(list(tmp_path.glob("v*.onnx"))) == 2  # older ones cleaned up
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind
    (tmp_path / POINTER).write_text(json.dumps({"version": "7", "hash": "x"}))
    with pytest.raises(ModelDirError, match="version"):
        read_pointer(tmp_path)
    (tmp_path / POINTER).write_text("{half")
    with pytest.raises(ModelDirError, match="not valid JSON"):
        read_pointer(tmp_path)


@pytest.mark.parametrize(
    "line, top, key, words",
    [
        ({"model_source": "manifest"}, {}, "line", "enrollment or aggregator_key"),
        ({"batch_max": 0}, {}, "line", "batch_max"),
        ({"canary": {"margin": -1}}, {}, "line.canary", "margin"),
        ({"site": "a/b"}, {}, "line", "site id"),
        ({"poll": 1}, {}, "line.poll", "unknown key"),
        ({}, {"output": {"topic": "plant/#"}}, "output", "wildcards"),
        ({}, {"rows": {"features": []}}, "rows", "at least one tag"),
        ({"model_source": "manifest", "aggregator_key": "k"}, {}, "line", "needs site_key"),
        (
            {"model_source": "manifest", "aggregator_key": "k", "site_key": "s"},
            {"broker": {"url": "http://x"}},
            "broker.url",
            "mqtt://",
        ),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, line, top, key, words) -> None:
    with pytest.raises(ConfigError) as exc:
        make_config(tmp_path, line, **top)
    assert exc.value.file.endswith("line.toml")
    assert exc.value.key == key
    assert words in exc.value.message


def test_example_config_parses() -> None:
    from pathlib import Path

    from edge.inference.config import load_infer_config

    example = Path(__file__).resolve().parents[2] / "edge" / "inference" / "line.example.toml"
    cfg = load_infer_config(example)
    assert cfg.line.site == "press-3" and cfg.line.canary.margin == 0.02
    assert cfg.output.broker == {"url": "mqtt://127.0.0.1:1884"} and len(cfg.sources) == 1
