"""What the blend tests share: a model's parameters as the personal code keeps them, and an ONNX scored in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from models import build_model
from models.flat import personal_state, shared_state
from models.spec import ModelSpec


def model_params(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """A freshly initialised model's shared and personal tensors, by name."""
    m = build_model(spec, seed=seed)
    return {**shared_state(m, spec), **personal_state(m, spec)}


def ort_scores(onnx: bytes, x: np.ndarray) -> np.ndarray:
    """The graph's output ``y`` on ``x`` in real ONNX Runtime (CPU), flat, as float64."""
    sess = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x.astype(np.float32)})[0].ravel().astype(np.float64)
