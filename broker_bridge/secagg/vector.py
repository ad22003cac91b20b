"""One flat vector per model delta, in an order both sides derive from the tensor names.

Masks and quantisation work on one vector; the site flattens its delta's tensors in sorted-name
order and the aggregator cuts the cohort sum back into the model's shapes in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def flatten(tensors: Mapping[str, np.ndarray]) -> np.ndarray:
    """float64 concatenation of the tensors, by sorted name."""
    if not tensors:
        return np.zeros(0)
    return np.concatenate([np.asarray(tensors[k], dtype=np.float64).ravel() for k in sorted(tensors)])


def unflatten(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten` for the given shapes (float32 arrays)."""
    total = sum(math.prod(s) for s in shapes.values())
    if vector.size != total:
        raise ValueError(f"vector has {vector.size} values, the shapes need {total}")
    out, pos = {}, 0
    for k in sorted(shapes):
        n = math.prod(shapes[k])
        out[k] = np.asarray(vector[pos : pos + n], dtype=np.float32).reshape(shapes[k])
        pos += n
    return out
