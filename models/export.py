"""ONNX export for the line-inference service (onnxruntime).

Contract: one input ``x`` of shape ``(batch, *spec.input_shape)`` float32, one
output ``y`` of shape ``(batch, n_outputs)`` float32 holding the score defined
by :class:`models.nets.Scorer` (probability / value / reconstruction error).
The batch axis is dynamic. Opset 17 with the TorchScript exporter: it needs
no onnxscript, unrolls the fixed-length GRU loop, and onnxruntime ≥ 1.14 runs it.

Why not torch's current exporter (``dynamo=True``): it works for every model kind here, but measured with
``bench/onnx_export.py`` it costs 14-40× the CPU of this one per export (seconds per version for a GRU),
and an edge exports on every version it adopts, on a line-side PC. torch deprecates the TorchScript
exporter: that warning is not hidden, it is logged once per process (``onnx.exporter_deprecated``) so an
operator sees it, and any other warning an export raises goes on as raised. The one exception is the
tracer's note on Opacus's DPGRU (``len()`` of a tensor): the window is fixed by the spec, so the traced
loop is exact, which tests/models checks against torch to 1e-5 for every kind.
"""

from __future__ import annotations

import copy
import io
import logging
import threading
import warnings

import torch
from torch import nn

from fedline.logs import event
from models.nets import Scorer, unwrap
from models.onnx_graph import OPSET
from models.spec import ModelSpec

log = logging.getLogger("fedline.models")

_EXPORT_LOCK = threading.Lock()  # torch.onnx.export keeps global state: one export at a time per process


def export_onnx(model: nn.Module, spec: ModelSpec) -> bytes:
    """Serialise ``model`` (its current weights, personal ones included) to ONNX bytes.

    Thread-safe: exports are serialised, since the exporter keeps global state
    (an agent and an aggregator in one process, or two agents in a test, export
    from worker threads).
    """
    return export_scorer(Scorer(copy.deepcopy(unwrap(model)).cpu().float(), spec).eval(), spec)


def export_scorer(scorer: nn.Module, spec: ModelSpec) -> bytes:
    """Serialise a module that already scores as the line does (a :class:`Scorer`, or a blend of two,
    ``edge.blend_export``) to ONNX bytes with the contract above; thread-safe like :func:`export_onnx`."""
    example = torch.zeros((2, *spec.input_shape), dtype=torch.float32)
    buf = io.BytesIO()
    with _EXPORT_LOCK, warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
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
    _route(raised)
    return buf.getvalue()


_deprecation_logged = False


def _route(raised: list[warnings.WarningMessage]) -> None:
    """Log the exporter's deprecation once per process, drop the DPGRU tracer note, re-raise the rest."""
    global _deprecation_logged
    for w in raised:
        text = str(w.message)
        if issubclass(w.category, torch.jit.TracerWarning) and "dp_rnn" in w.filename and "len" in text:
            continue  # fixed window: the traced loop is exact (see the module docstring)
        if issubclass(w.category, DeprecationWarning) and "onnx" in (w.filename + text).lower():
            if not _deprecation_logged:
                _deprecation_logged = True
                event(log, "onnx.exporter_deprecated", logging.WARNING, exporter="torchscript", detail=text[:300])
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
