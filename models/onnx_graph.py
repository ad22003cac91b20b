"""The ONNX of a dense model written from its weights with the ``onnx`` package: no torch, no tracing.

Why: the aggregator publishes an ONNX of every version, and ``torch.onnx`` (``models.export``) needed torch
imported for it, the largest part of the aggregator's start (BENCHMARKS.md, issue 19). For the kinds whose
graph is a fixed chain of standard operators (``mlp``, ``autoencoder``) this module writes the graph torch's
TorchScript exporter writes for :class:`models.nets.Scorer`: the same operators in the same order, the same
node, tensor, input and output names (``model.body.0.weight``, ``/model/body/body.0/Gemm``, ...), opset 17,
the batch axis dynamic, so the contract of ``models.export`` holds unchanged and a line's step bound
(``edge.inference.onnx_params``) sees the same tensors under the same keys. ``tests/models/test_onnx_graph.py``
checks the serialised graph equal to torch's export byte for byte, and the outputs equal in onnxruntime.

One difference, on purpose: torch's exporter merges initializers whose values happen to be equal (e.g. a
declared ``input_low`` equal to ``input_mean``) into one plus an ``Identity`` node; this module keeps each
tensor under its own name, so a model's layout never depends on its values. The outputs are the same.

The model's producer is ``fedline`` (it is not torch's export). Other kinds (``cnn1d``, ``gru``) are exported
with torch (:func:`covers` says which).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from models.names import ModelStateError
from models.seed_init import Layer, layers
from models.spec import ModelSpec

KINDS = ("mlp", "autoencoder")
OPSET = 17  # models.export's too
IR_VERSION = 8  # what torch 2.x's exporter writes for opset 17 (onnxruntime >= 1.14 reads it)


def covers(spec: ModelSpec) -> bool:
    """Whether :func:`build_onnx` writes this model (else export it with torch, ``models.export``)."""
    return spec.kind in KINDS


class _Graph:
    def __init__(self) -> None:
        from onnx import helper

        self.helper = helper
        self.nodes: list[Any] = []

    def node(self, op: str, scope: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        """Append ``op`` named as torch names it (``<scope>/<Op>``); its output ``<name>_output_0`` unless given."""
        name = f"{scope}/{op}"
        out = output or f"{name}_output_0"
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def dense(self, x: str, group: str, found: list[Layer], relu_last: bool) -> str:
        """A ``models.nets._dense`` Sequential named ``group``: Gemm, Relu, ..., Gemm (then Relu if ``relu_last``)."""
        for i, layer in enumerate(found):
            index = int(layer.prefix.rsplit(".", 1)[1])
            x = self.gemm(x, f"/model/{group}/{group}.{index}", layer.prefix)
            if relu_last or i < len(found) - 1:
                x = self.node("Relu", f"/model/{group}/{group}.{index + 1}", [x])
        return x

    def gemm(self, x: str, scope: str, prefix: str, out: str | None = None) -> str:
        """``nn.Linear`` as torch exports it: ``x @ W.T + b``."""
        w, b = f"model.{prefix}.weight", f"model.{prefix}.bias"
        return self.node("Gemm", scope, [x, w, b], out, alpha=1.0, beta=1.0, transB=1)


def _check(spec: ModelSpec, params: Mapping[str, np.ndarray], found: list[Layer]) -> None:
    want = {
        f"{layer.prefix}.{p}": s for layer in found for p, s in (("weight", layer.weight), ("bias", layer.weight[:1]))
    }
    if list(params) != list(want):
        raise ModelStateError(f"parameters {list(params)} do not match the {spec.kind} model's {list(want)}")
    for name, shape in want.items():
        if tuple(np.shape(params[name])) != shape:
            raise ModelStateError(f"parameter {name!r} has shape {np.shape(params[name])}, the model's is {shape}")


def _constants(spec: ModelSpec) -> dict[str, np.ndarray]:
    """The standardisation's buffers (``models.nets._Standardise``), those the graph uses, in torch's order."""
    n = spec.n_features
    low, high = spec.saturation()
    out = {
        "model.norm.mean": np.array(spec.input_mean or [0.0] * n, np.float32),
        "model.norm.scale": np.array(spec.input_scale or [1.0] * n, np.float32),
    }
    if low:
        out["model.norm.low"] = np.array(low, np.float32)
        out["model.norm.high"] = np.array(high, np.float32)
    return out


def build_onnx(spec: ModelSpec, params: Mapping[str, np.ndarray]) -> bytes:
    """The ONNX bytes of ``Scorer(build_model(spec))`` holding ``params`` (every parameter, personal ones
    included, in the model's order): what ``models.export.export_onnx`` writes for it (module docstring)."""
    from onnx import OperatorSetIdProto, TensorProto, helper, numpy_helper

    found = layers(spec)
    if not covers(spec) or found is None:
        raise ValueError(f"build_onnx writes kinds {KINDS}, not {spec.kind!r}: export it with models.export")
    _check(spec, params, found)
    g = _Graph()
    constants = _constants(spec)
    x = "x"
    if "model.norm.low" in constants:  # Min then Max (Clip takes only scalar bounds)
        x = g.node("Min", "/model/norm", [x, "model.norm.high"])
        x = g.node("Max", "/model/norm", [x, "model.norm.low"])
    x = g.node("Sub", "/model/norm", [x, "model.norm.mean"])
    x = g.node("Div", "/model/norm", [x, "model.norm.scale"])
    x = flat = g.node("Flatten", "/model", [x], axis=1)
    body = [layer for layer in found if layer.prefix.startswith("body.")]
    head = [layer for layer in found if not layer.prefix.startswith("body.")]
    x = g.dense(x, "body", body, relu_last=True)
    if spec.kind == "mlp":
        x = g.gemm(x, "/model/head", "head", "y" if spec.task == "regression" else None)
        if spec.task == "classification":
            g.node("Sigmoid", "", [x], "y")
    else:  # autoencoder: the mean squared error against the standardised input, not saturated
        x = g.dense(x, "head", head, relu_last=False)
        target = flat  # without saturation the target is the encoder's input (torch's trace shares it too)
        if "model.norm.low" in constants:
            target = g.node("Sub", "/norm", ["x", "model.norm.mean"])
            target = g.node("Div", "/norm", [target, "model.norm.scale"])
            target = g.node("Flatten", "", [target], axis=1)
        err = g.node("Sub", "", [x, target])
        two = g.node("Constant", "", [], value=numpy_helper.from_array(np.array(2.0, np.float32)))
        err = g.node("Pow", "", [err, two])
        g.node("ReduceMean", "", [err], "y", axes=[1], keepdims=1)
    weights = {f"model.{name}": np.asarray(a, np.float32) for name, a in params.items()}
    inits = [numpy_helper.from_array(a, name) for name, a in {**constants, **weights}.items()]
    graph = helper.make_graph(
        g.nodes,
        "main_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *spec.input_shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", spec.n_outputs])],
        inits,
    )
    opset = OperatorSetIdProto()
    opset.version = OPSET  # the default domain, left unset as torch leaves it
    model = helper.make_model(graph, opset_imports=[opset], ir_version=IR_VERSION, producer_name="fedline")
    return bytes(model.SerializeToString())


def build_onnx_over(spec: ModelSpec, base: Mapping[str, np.ndarray], *states: Mapping[str, np.ndarray]) -> bytes:
    """:func:`build_onnx` of the model holding ``states``' parameters (later ones win) and ``base``'s for every
    parameter they do not give: ``base`` is version 0 (``models.seed_init.seed_params``), so an aggregator's ONNX
    carries the seed's head and a site's its own. A name ``base`` does not have is refused (``ModelStateError``)."""
    params = dict(base)
    for state in states:
        if unknown := set(state) - set(base):
            raise ModelStateError(f"parameters {sorted(unknown)} are not the {spec.kind} model's")
        params.update(state)
    return build_onnx(spec, params)
