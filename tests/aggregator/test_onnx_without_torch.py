"""The aggregator's version 0 and ONNX without torch (issue 19): the same bytes torch makes, a version's ONNX
scoring as torch's export of the same weights, and torch's exporter still used where the graph is not written."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from aggregator.core import AggregatorCore
from broker_bridge import envelope
from models import ModelSpec, ModelStateError, build_model, export_onnx, load_shared_state, shared_state
from tests.aggregator.helpers import make_federation

CNN = """
[model]
kind = "cnn1d"
n_features = 3
hidden = [4]
window = 5
personal = ["head."]
"""


def _ort(blob: bytes, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_version_0_is_torchs_and_a_versions_onnx_is_torchs_export(tmp_path) -> None:
    """The helper federation's MLP (seed 7, the head personal): version 0 as committed is the encoding of torch's
    ``build_model`` (the hash an edge compares with the one it built), and the ONNX of a moved version is torch's
    export of those weights with the seed's head: the same graph and the same scores."""
    fed = make_federation(tmp_path, ["a1", "a2"])
    core = AggregatorCore(fed.config())
    try:
        spec: ModelSpec = core.spec
        want = shared_state(build_model(spec, seed=7), spec)
        assert envelope.encode_tensors(core.model) == envelope.encode_tensors(want)
        assert not core.onnx_needs_torch()
        rng = np.random.default_rng(0)
        moved = {k: (v + rng.normal(0, 0.2, v.shape)).astype(np.float32) for k, v in core.model.items()}
        ours = core.onnx(moved)
        model = build_model(spec, seed=7)
        load_shared_state(model, spec, moved)
        theirs = export_onnx(model, spec)
        a, b = onnx.load_from_string(ours), onnx.load_from_string(theirs)
        assert a.graph.SerializeToString() == b.graph.SerializeToString()
        x = rng.normal(0, 3, (64, spec.n_features)).astype(np.float32)
        np.testing.assert_array_equal(_ort(ours, x), _ort(theirs, x))
        assert core.onnx() != ours  # the default is the current version, not the last one asked for
    finally:
        core.close()


def test_a_model_the_graph_writer_does_not_cover_is_exported_with_torch(tmp_path) -> None:
    fed = make_federation(tmp_path, ["a1"])
    core = AggregatorCore(fed.config(spec=CNN))
    try:
        assert core.onnx_needs_torch()
        blob = core.onnx()
        assert onnx.load_from_string(blob).producer_name == "pytorch"
        model = core.torch_model()
        x = np.random.default_rng(1).normal(size=(8, 5, 3)).astype(np.float32)
        np.testing.assert_allclose(_ort(blob, x), _ort(export_onnx(model, core.spec), x), atol=1e-6)
    finally:
        core.close()


def test_weights_of_another_model_are_refused(tmp_path) -> None:
    fed = make_federation(tmp_path, ["a1"])
    core = AggregatorCore(fed.config())
    try:
        with pytest.raises(ModelStateError, match="not the mlp model's"):
            core.onnx({**core.model, "tail.weight": np.zeros((1, 8), np.float32)})
    finally:
        core.close()
