"""Small ONNX models for the inference tests and benchmark, built with onnx.helper (no torch).

``linear_onnx`` is ``y = sigmoid(x @ w + b)`` with a dynamic batch axis: the
same contract as ``models.export_onnx`` (input ``x``, output ``y`` of shape
``(batch, 1)``), cheap to build by the dozen, and easy to score by hand.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def mlp_onnx(weights: list[np.ndarray], biases: list[np.ndarray], sigmoid: bool = True, input_name: str = "x") -> bytes:
    """Dense layers with ReLU between them, optional sigmoid at the end."""
    n_in = weights[0].shape[0]
    nodes, inits = [], []
    cur = input_name
    for i, (w, b) in enumerate(zip(weights, biases)):
        inits += [
            numpy_helper.from_array(np.asarray(w, np.float32), f"w{i}"),
            numpy_helper.from_array(np.asarray(b, np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [cur, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
        ]
        cur = f"a{i}"
        if i < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"]))
            cur = f"r{i}"
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", [cur], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", [cur], ["y"]))
    n_out = weights[-1].shape[1]
    graph = helper.make_graph(
        nodes,
        "line-model",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n_out])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="fedline-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def linear_onnx(w: np.ndarray, b: float = 0.0, sigmoid: bool = True) -> bytes:
    w = np.asarray(w, np.float32).reshape(-1, 1)
    return mlp_onnx([w], [np.asarray([b], np.float32)], sigmoid=sigmoid)


def linear_score(w: np.ndarray, b: float, x: np.ndarray) -> np.ndarray:
    """What ``linear_onnx(w, b)`` computes, in numpy (float64)."""
    z = x.astype(np.float64) @ np.asarray(w, np.float64).reshape(-1) + b
    return 1.0 / (1.0 + np.exp(-z))


def nan_onnx(n_features: int) -> bytes:
    """A model that parses and has the right shapes but scores NaN (log of a negative number)."""
    w = -np.ones((n_features, 1), np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Sub", ["m", "one"], ["n"]),
            helper.make_node("Log", ["n"], ["y"]),
        ],
        "nan-model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones((1,), np.float32), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()
