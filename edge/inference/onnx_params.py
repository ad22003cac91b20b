"""The parameters inside an ONNX model, so a line can measure how far a new version moved.

Why from the ONNX and not from the weights the manifest also names: a line in
``manifest`` mode serves the aggregator's ONNX as it is, so the step it bounds
(``models.step_bound``) must be the step of what it would run. Weights and ONNX
are separate blobs; whoever holds the aggregator's signing key (the threat the
bound is for) could sign harmless weights next to a far-off ONNX.

Every floating-point tensor counts: graph initializers and ``Constant`` nodes'
values, in the main graph and in subgraphs (a GRU exported as a loop keeps its
weights there), each keyed by where it sits. Moving a weight from an initializer
into a ``Constant`` node, renaming it, or reshaping it changes the set of keys
or shapes: :func:`layout_change` names that, and the line refuses such a model
as a step too (an honest version of one federation never changes its layout).

Reads the protobuf with the ``onnx`` package (no torch; part of the ``line`` extra).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from edge.inference.session import ModelRefused
from models.step_bound import StepBound


def onnx_params(blob: bytes) -> dict[str, np.ndarray]:
    """Every floating-point tensor stored in the model, keyed ``<graph path>/<name>``.

    Raises :class:`ModelRefused` (``load``) when the bytes are not an ONNX model.
    """
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load_from_string(blob)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelRefused("load", f"not an ONNX model: {type(exc).__name__}: {exc}") from None
    out: dict[str, np.ndarray] = {}
    for path, tensor in _tensors(model.graph, "graph"):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ModelRefused("load", f"tensor {path} keeps its data outside the model; a line serves one file")
        arr = numpy_helper.to_array(tensor)
        if np.issubdtype(arr.dtype, np.floating):
            out[path] = np.asarray(arr, dtype=np.float64)
    return out


def _tensors(graph: Any, where: str) -> Iterator[tuple[str, Any]]:
    from onnx import AttributeProto

    for t in graph.initializer:
        yield f"{where}/{t.name}", t
    for i, node in enumerate(graph.node):
        for attr in node.attribute:
            at = f"{where}/{node.op_type}:{node.output[0] if node.output else i}.{attr.name}"
            if attr.type == AttributeProto.TENSOR:
                yield at, attr.t
            elif attr.type == AttributeProto.TENSORS:
                for j, t in enumerate(attr.tensors):
                    yield f"{at}[{j}]", t
            elif attr.type == AttributeProto.GRAPH:
                yield from _tensors(attr.g, at)
            elif attr.type == AttributeProto.GRAPHS:
                for j, g in enumerate(attr.graphs):
                    yield from _tensors(g, f"{at}[{j}]")


def layout_change(current: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray]) -> str | None:
    """What differs in the parameters' names and shapes of two versions, or None when nothing does."""
    gone, added = sorted(set(current) - set(new)), sorted(set(new) - set(current))
    if gone or added:
        return f"the model's tensors changed: {len(gone)} gone (e.g. {gone[:2]}), {len(added)} new (e.g. {added[:2]})"
    for name in sorted(current):
        if current[name].shape != new[name].shape:
            return f"tensor {name} changed shape from {list(current[name].shape)} to {list(new[name].shape)}"
    return None


def check_step(bound: StepBound, serving: bytes, serving_version: int, new: bytes, new_version: int) -> None:
    """Refuse (``ModelRefused("step", ...)``) a version whose ONNX moved too far from the one in service."""
    if not bound.enabled:
        return
    cur, nxt = onnx_params(serving), onnx_params(new)
    why = layout_change(cur, nxt) or bound.refusal(cur, nxt, new_version - serving_version)
    if why is not None:
        raise ModelRefused("step", f"version {new_version} against {serving_version} in service: {why}")


__all__ = ["check_step", "layout_change", "onnx_params"]
