"""Robust building blocks of the reduce step, on ``dict[str, np.ndarray]`` states.

Why these: a per-update norm bound limits what any one site can do
(Sun et al., "Can You Really Backdoor Federated Learning?", 2019), and
rescaling every update to one norm (as FLTrust does, Cao et al., NDSS 2021)
takes away a short delta's advantage under the median (:func:`rescale`); the
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

from aggregator import median_network
from aggregator.scaled_sum import Scaled
from broker_bridge.quantised import Int8Delta

State = dict[str, np.ndarray]


def l2_norm(delta: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm over every tensor (inf if the squares overflow float32: far beyond any bound)."""
    total = 0.0
    for a in delta.values():
        flat = np.asarray(a).reshape(-1)
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip(
    delta: Mapping[str, np.ndarray], bound: float, norm: float | None = None
) -> tuple[Mapping[str, np.ndarray], float]:
    """``delta`` scaled down to L2 norm ``bound`` if it is longer; returns (delta, scale).

    ``norm`` may be given when already known (validation computes it), saving a pass.
    """
    if isinstance(delta, Int8Delta):  # a factor on the int8 blocks (broker_bridge.quantised): no float32 copy
        scale = bound / delta.norm() if 0 < bound < delta.norm() else 1.0
        return (delta.scaled(scale) if scale != 1.0 else delta), scale
    if bound <= 0:
        return dict(delta), 1.0
    norm = l2_norm(delta) if norm is None else norm
    if norm <= bound:
        return dict(delta), 1.0
    scale = bound / norm
    return Scaled(delta, scale), scale  # no copy: the reduce folds the scale into its pass (aggregator.scaled_sum)


def rescale(
    delta: Mapping[str, np.ndarray], target: float, norm: float | None = None
) -> tuple[Mapping[str, np.ndarray], float]:
    """``delta`` scaled to L2 norm ``target``, down *or up*; returns (delta, scale). A zero delta stays zero.

    Why up as well (the buffer's norm equalised, as FLTrust rescales every update to one norm, Cao et al.
    2021): clipping only bounds how long a delta is, and a short one keeps its freedom of scale; under the
    coordinate-wise median a short backdoored delta sits *between* two honest values in more coordinates,
    and there the median takes the attacker's own value (RELIABILITY.md, the "samples" attack). Rescaled to
    the buffer's median norm, every update has the same length, so a delta's scale buys nothing.
    """
    if isinstance(delta, Int8Delta):
        n = delta.norm()
        scale = target / n if target > 0 and n > 0 else 1.0
        return (delta.scaled(scale) if scale != 1.0 else delta), scale
    norm = l2_norm(delta) if norm is None else norm
    if target <= 0 or norm <= 0 or not math.isfinite(norm):
        return dict(delta), 1.0
    scale = target / norm
    return {
        k: (np.asarray(v, np.float32) * np.float32(scale)).astype(np.float32, copy=False) for k, v in delta.items()
    }, scale


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
    return {name: median_of(np.stack([np.asarray(d[name], np.float32) for d in deltas])) for name in deltas[0]}


def trimmed_mean(deltas: Sequence[Mapping[str, np.ndarray]], trim: float) -> State:
    """Coordinate-wise mean after dropping the ``floor(trim * n)`` smallest and largest values."""
    return {
        name: trimmed_mean_of(np.stack([np.asarray(d[name], np.float32) for d in deltas]), trim) for name in deltas[0]
    }


def median_of(stacked: np.ndarray) -> np.ndarray:
    """The median along axis 0 of ``stacked`` (sorted in place): the middle value, or the mean of the two.

    What ``np.median`` computes, faster (an in-place sort of the stack the caller made anyway): the median
    is the default reduce, so it runs on every version.
    """
    n = stacked.shape[0]
    if 3 <= n <= median_network.MAX_K and stacked.dtype == np.float32 and stacked.flags.c_contiguous:
        return median_network.median_rows(stacked)  # the same floats, a selection network instead of a sort
    stacked.sort(axis=0)
    mid = stacked[n // 2] if n % 2 else stacked[n // 2 - 1 : n // 2 + 1].mean(axis=0, dtype=np.float32)
    return np.array(mid, np.float32)


def trimmed_mean_of(stacked: np.ndarray, trim: float) -> np.ndarray:
    """The mean along axis 0 after dropping ``floor(trim * n)`` values at each end (sorts ``stacked`` in place)."""
    n = stacked.shape[0]
    k = math.floor(trim * n)
    if n - 2 * k < 1:
        k = (n - 1) // 2
    stacked.sort(axis=0)
    return np.array(stacked[k : n - k].mean(axis=0, dtype=np.float32), np.float32)
