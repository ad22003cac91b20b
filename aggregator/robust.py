"""Robust building blocks of the reduce step, on ``dict[str, np.ndarray]`` states.

Why these three: a per-update norm bound limits what any one site can do
(Sun et al., "Can You Really Backdoor Federated Learning?", 2019); the
coordinate-wise median and trimmed mean (Yin et al., "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates", ICML 2018) ignore a
minority of arbitrary updates. They are options of one reduce step
(:meth:`aggregator.strategies.base.Strategy.reduce`), not separate code paths.
The median and trimmed mean are unweighted, as in Yin et al.: a weighted
median would let one site claiming many samples pick the result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

State = dict[str, np.ndarray]


def l2_norm(delta: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm over every tensor (inf if the squares overflow float32: far beyond any bound)."""
    total = 0.0
    for a in delta.values():
        flat = np.asarray(a).reshape(-1)
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip(delta: Mapping[str, np.ndarray], bound: float, norm: float | None = None) -> tuple[State, float]:
    """``delta`` scaled down to L2 norm ``bound`` if it is longer; returns (delta, scale).

    ``norm`` may be given when already known (validation computes it), saving a pass.
    """
    if bound <= 0:
        return dict(delta), 1.0
    norm = l2_norm(delta) if norm is None else norm
    if norm <= bound:
        return dict(delta), 1.0
    scale = bound / norm
    return {k: (v * np.float32(scale)).astype(np.float32, copy=False) for k, v in delta.items()}, scale


def weighted_mean(deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> State:
    """sum_i w_i d_i / sum_i w_i, accumulated in float32 in place."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    out: State = {}
    for name in deltas[0]:
        acc = np.zeros(deltas[0][name].shape, dtype=np.float32)
        for d, w in zip(deltas, weights):
            add_scaled(acc, d[name], w / total)
        out[name] = acc
    return out


_BLOCK = 1 << 16


def add_scaled(acc: np.ndarray, x: np.ndarray, w: float) -> None:
    """``acc += w * x`` in place, in blocks of 64k values so no model-sized temporary is made."""
    flat_acc, flat_x = acc.reshape(-1), np.asarray(x).reshape(-1)
    if flat_x.size <= _BLOCK:
        flat_acc += np.float32(w) * flat_x
        return
    buf = np.empty(_BLOCK, dtype=np.float32)
    for i in range(0, flat_x.size, _BLOCK):
        n = min(_BLOCK, flat_x.size - i)
        np.multiply(flat_x[i : i + n], np.float32(w), out=buf[:n])
        flat_acc[i : i + n] += buf[:n]


def median(deltas: Sequence[Mapping[str, np.ndarray]]) -> State:
    """Coordinate-wise median (unweighted)."""
    return {name: np.median(np.stack([d[name] for d in deltas]), axis=0).astype(np.float32) for name in deltas[0]}


def trimmed_mean(deltas: Sequence[Mapping[str, np.ndarray]], trim: float) -> State:
    """Coordinate-wise mean after dropping the ``floor(trim * n)`` smallest and largest values."""
    n = len(deltas)
    k = math.floor(trim * n)
    if n - 2 * k < 1:
        k = (n - 1) // 2
    out: State = {}
    for name in deltas[0]:
        stacked = np.sort(np.stack([d[name] for d in deltas]), axis=0)
        out[name] = stacked[k : n - k].mean(axis=0, dtype=np.float32).astype(np.float32)
    return out
