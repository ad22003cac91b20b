"""Turn ONNX bytes into a checked, ready-to-score model, or say why not.

Everything here runs in a worker thread, off the scoring path: building an
``InferenceSession`` takes milliseconds to seconds, probing and the canary run
the model on a few hundred rows. A model is refused with a
:class:`ModelRefused` whose ``reason`` is one word an operator can count:

- ``load``: onnxruntime cannot parse or build it (truncated, corrupt file)
- ``width``: its input is not ``x`` of shape ``(batch, *row_shape)``
- ``probe``: the probe inputs give the wrong output shape or non-finite scores
- ``canary``: on recent labelled rows it is worse than the model in service
  by more than the configured margin
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from broker_bridge.errors import ModelRefused


@dataclass(frozen=True)
class ModelInfo:
    """Where a model came from: its version, its content hash, and what was said about it."""

    version: int
    hash: str
    origin: str  # "manifest" | "model_dir" | "state"
    meta: dict[str, Any] = field(default_factory=dict)
    seen_at: float = 0.0  # time.monotonic() when the new version was first noticed


class LoadedModel:
    """An onnxruntime session that passed the probe, plus where it came from.

    :meth:`score` is safe to call from several threads at once (onnxruntime
    sessions are), which the canary relies on.
    """

    def __init__(self, session: ort.InferenceSession, info: ModelInfo, blob: bytes) -> None:
        self.session = session
        self.info = info
        self.blob = blob
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name

    @property
    def version(self) -> int:
        return self.info.version

    def score(self, x: np.ndarray) -> np.ndarray:
        """Scores of a batch ``x`` of shape ``(batch, *row_shape)``: a float array ``(batch,)``."""
        y = self.session.run([self.output_name], {self.input_name: x})[0]
        return y.reshape(len(x), -1)[:, 0]


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Small-gateway settings: few threads, quiet logs, full graph optimisation."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


def probe_inputs(row_shape: Sequence[int], recent: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Rows that every usable model must score finitely: zeros, ones, mid-range, random, recent."""
    shape = tuple(row_shape)
    rng = np.random.default_rng(seed)
    parts = [
        np.zeros((1, *shape)),
        np.ones((1, *shape)),
        np.full((1, *shape), 0.5),
        rng.uniform(0.0, 1.0, size=(5, *shape)),
    ]
    if recent is not None and len(recent):
        parts.append(recent[-16:])
    return np.concatenate(parts).astype(np.float32)


def build_model(
    blob: bytes, info: ModelInfo, row_shape: Sequence[int], *, threads: int = 1, recent: np.ndarray | None = None
) -> LoadedModel:
    """Build a session from ``blob`` and probe it; :class:`ModelRefused` if it is unusable."""
    try:
        sess = ort.InferenceSession(blob, session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/InvalidProtobuf types
        raise ModelRefused(
            "load", f"onnxruntime cannot load version {info.version}: {str(exc).splitlines()[0][:300]}"
        ) from None
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if len(inputs) != 1 or len(outputs) < 1:
        raise ModelRefused(
            "width",
            f"version {info.version} has {len(inputs)} inputs and "
            f"{len(outputs)} outputs; expected one input 'x' and output 'y'",
        )
    inp = inputs[0]
    want = tuple(row_shape)
    dims = tuple(inp.shape)
    if inp.type != "tensor(float)":
        raise ModelRefused("width", f"version {info.version} input {inp.name!r} is {inp.type}, expected float32")
    if len(dims) != 1 + len(want) or any(isinstance(d, int) and d != w for d, w in zip(dims[1:], want)):
        raise ModelRefused(
            "width",
            f"version {info.version} input {inp.name!r} has shape {list(dims)}, "
            f"but rows here have shape {list(want)} (batch first)",
        )
    model = LoadedModel(sess, info, blob)
    x = probe_inputs(want, recent)
    for batch in (x, x[:1]):
        try:
            y = sess.run([model.output_name], {model.input_name: batch})[0]
        except Exception as exc:
            raise ModelRefused(
                "width" if "dimension" in str(exc).lower() or "shape" in str(exc).lower() else "probe",
                f"version {info.version} fails on probe rows of shape "
                f"{list(batch.shape)}: {str(exc).splitlines()[0][:300]}",
            ) from None
        if y.ndim != 2 or y.shape != (len(batch), 1):
            raise ModelRefused(
                "probe",
                f"version {info.version} output {model.output_name!r} has shape "
                f"{list(y.shape)} for {len(batch)} rows; expected [{len(batch)}, 1]",
            )
        if not np.all(np.isfinite(y)):
            raise ModelRefused("probe", f"version {info.version} gives non-finite scores on probe rows")
    return model


def canary_loss(scores: np.ndarray, labels: np.ndarray, task: str) -> float:
    """Mean loss of ``scores`` against ``labels``: log loss for classification, MSE for regression."""
    if task == "classification":
        p = np.clip(scores.astype(np.float64), 1e-6, 1 - 1e-6)
        y = (labels > 0.5).astype(np.float64)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return float(np.mean((scores.astype(np.float64) - labels) ** 2))


@dataclass(frozen=True)
class CanaryResult:
    rows: int
    old_loss: float
    new_loss: float
    seconds: float


def canary_check(
    new: LoadedModel, old: LoadedModel, x: np.ndarray, y: np.ndarray, task: str, margin: float
) -> CanaryResult:
    """Score the recent labelled rows with both models; refuse ``new`` if worse by more than ``margin``."""
    t0 = time.perf_counter()
    new_loss = canary_loss(new.score(x), y, task)
    old_loss = canary_loss(old.score(x), y, task)
    result = CanaryResult(len(x), old_loss, new_loss, time.perf_counter() - t0)
    if not np.isfinite(new_loss) or new_loss > old_loss + margin:
        raise ModelRefused(
            "canary",
            f"version {new.version} loss {new_loss:.4f} on {len(x)} recent labelled "
            f"rows vs {old_loss:.4f} for version {old.version} in service "
            f"(margin {margin})",
        )
    return result
