"""ONNX export for the line-inference service (onnxruntime).

Contract: one input ``x`` of shape ``(batch, *spec.input_shape)`` float32, one
output ``y`` of shape ``(batch, n_outputs)`` float32 holding the score defined
by :class:`models.nets.Scorer` (probability / value / reconstruction error).
The batch axis is dynamic. Opset 17 with the TorchScript exporter: it needs
no onnxscript, unrolls the fixed-length GRU loop, and onnxruntime ≥ 1.14 runs it.
"""

from __future__ import annotations

import copy
import io
import threading
import warnings

import torch
from torch import nn

from models.nets import Scorer, unwrap
from models.spec import ModelSpec

OPSET = 17
_EXPORT_LOCK = threading.Lock()  # torch.onnx.export keeps global state: one export at a time per process


def export_onnx(model: nn.Module, spec: ModelSpec) -> bytes:
    """Serialise ``model`` (its current weights, personal ones included) to ONNX bytes.

    Thread-safe: exports are serialised, since the exporter keeps global state
    (an agent and an aggregator in one process, or two agents in a test, export
    from worker threads).
    """
    scorer = Scorer(copy.deepcopy(unwrap(model)).cpu().float(), spec).eval()
    example = torch.zeros((2, *spec.input_shape), dtype=torch.float32)
    buf = io.BytesIO()
    with _EXPORT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer notes on DPGRU
        torch.onnx.export(
            scorer,
            (example,),
            buf,  # type: ignore[arg-type]  # the stubs name paths only; a file object is documented
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    return buf.getvalue()
