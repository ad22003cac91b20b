"""A clipped delta kept as (delta, scale), and the reduce's weighted sum of such deltas in one cache-blocked pass.

Why: FedBuff's mean reduce is ``Σ c_i · clip(Δ_i)``. Clipping used to make a
scaled copy of every clipped delta (half of a buffer's deltas under
``clip_to_median``), and the sum then added one whole delta after another, so
the accumulator (4 MB at 1M parameters) went through memory once per delta.
Here the clip's scale stays a number (:class:`Scaled`) until the sum reads the
delta, and :func:`weighted_sum_into` walks the accumulator in blocks of
:data:`BLOCK` values, adding every delta's block while the accumulator's block
stays in cache: each delta is read once, the accumulator once.

Bit for bit the same floats as before: each value is rounded exactly as the
scaled copy and ``robust.add_scaled`` rounded it (``s · x`` to float32, then
``c ·`` that, then added), and the deltas are added in the same order.
Measured at 1M parameters, K = 10: 11–17 ms per reduce before, 7.3 ms after.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

#: values per block: 64k float32 (256 KB) for the accumulator and the scratch buffer, within a core's L2 cache
BLOCK = 1 << 16


class Scaled(Mapping[str, np.ndarray]):
    """``delta`` times ``scale`` (float32), computed only where a tensor is read.

    Reading a tensor gives exactly the scaled copy clipping used to make; the reduce's sums read
    :attr:`delta` and :attr:`scale` instead and fold the scale into their own pass.
    """

    def __init__(self, delta: Mapping[str, np.ndarray], scale: float) -> None:
        self.delta = delta
        self.scale = scale

    def __getitem__(self, name: str) -> np.ndarray:
        return (self.delta[name] * np.float32(self.scale)).astype(np.float32, copy=False)

    def __iter__(self) -> Iterator[str]:
        return iter(self.delta)

    def __len__(self) -> int:
        return len(self.delta)


Term = tuple[np.ndarray, float, "float | None"]  # (x, coefficient c, scale s or None): c · (s · x)


def term(delta: Mapping[str, np.ndarray], name: str, coefficient: float) -> Term:
    """One delta's tensor ``name`` as a term of :func:`weighted_sum_into` (a :class:`Scaled` keeps its scale)."""
    if isinstance(delta, Scaled):
        return delta.delta[name], coefficient, delta.scale
    return delta[name], coefficient, None


def weighted_sum_into(acc: np.ndarray, terms: Sequence[Term]) -> None:
    """``acc += c · (s · x)`` for every term in order, block by block: each value rounded as ``add_scaled`` of
    the scaled copy rounds it, the accumulator's block kept in cache while every term is added to it."""
    flat = acc.reshape(-1)
    xs = [(np.asarray(x).reshape(-1), np.float32(c), None if s is None else np.float32(s)) for x, c, s in terms]
    buf = np.empty(min(BLOCK, flat.size), np.float32)
    for i in range(0, flat.size, BLOCK):
        j = min(i + BLOCK, flat.size)
        out, b = flat[i:j], buf[: j - i]
        for x, c, s in xs:
            if s is None:
                np.multiply(x[i:j], c, out=b)
            else:
                np.multiply(x[i:j], s, out=b)
                np.multiply(b, c, out=b)
            out += b
