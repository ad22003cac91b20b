"""Fixed point in Z_{2^32} with stochastic rounding, sized so that a cohort's sum cannot overflow.

A member's weighted delta ``x`` is clamped to ``[-R, R]`` per coordinate (``R`` is the
cohort's ``clip_range``: the aggregator's per-site norm bound times the largest weight, so a
delta within the bound is never clamped, because no coordinate exceeds the L2 norm), scaled by

    scale = (2^31 - 1 - n) / (n * R)

and rounded stochastically (up with probability equal to the fraction), so the rounding is
unbiased. Each member's integer has ``|q| <= R*scale + 1``, so the sum of ``n`` members is at
most ``n*R*scale + n = 2^31 - 1`` in absolute value: it never wraps when read back as a signed
32-bit integer, whatever subset of the ``n`` members survives.

Error bound, per coordinate of the cohort sum (no clamping): each member's rounding error is
strictly below ``1/scale``, so ``|dequantised sum - exact sum| < n / scale = n^2 R / (2^31 - 1 - n)``
(e.g. 1.2e-8 for n = 5, R = 1). Rounding happens after the DP noise, so it is post-processing
and epsilon is unchanged; the rounding randomness needs no secrecy (it is not a mask) and comes
from a private generator seeded by the OS CSPRNG (:mod:`broker_bridge.rounding`, shared with the
8-bit update encoding).
"""

from __future__ import annotations

import numpy as np

from broker_bridge.rounding import private_rng, stochastic_round

_LIMIT = 2**31 - 1


def scale_for(clip_range: float, n_members: int) -> float:
    """The fixed-point scale every member and the aggregator derive from the announcement."""
    if not (clip_range > 0 and np.isfinite(clip_range)):
        raise ValueError(f"clip_range must be a positive finite number, got {clip_range!r}")
    if not 1 <= n_members < 2**20:
        raise ValueError(f"n_members must be in [1, 2^20), got {n_members!r}")
    return (_LIMIT - n_members) / (n_members * clip_range)


def error_bound(clip_range: float, n_members: int) -> float:
    """Largest possible per-coordinate error of a dequantised cohort sum (unclamped inputs)."""
    return n_members / scale_for(clip_range, n_members)


def quantise(
    x: np.ndarray, clip_range: float, n_members: int, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, int]:
    """Flat float vector -> (uint32 vector, number of clamped coordinates)."""
    scale = scale_for(clip_range, n_members)
    v = np.asarray(x, dtype=np.float64).ravel()
    if not np.all(np.isfinite(v)):
        raise ValueError("cannot quantise a vector with NaN or infinity")
    clamped = int(np.count_nonzero(np.abs(v) > clip_range))
    v = np.clip(v, -clip_range, clip_range) * scale
    q = stochastic_round(v, rng or private_rng())  # rounds up with probability frac(v): unbiased
    return q.astype(np.int64).astype(np.uint32), clamped  # int64 -> uint32 is reduction mod 2^32


def dequantise_sum(total: np.ndarray, clip_range: float, n_members: int) -> np.ndarray:
    """Sum of quantised vectors in Z_{2^32} -> float64 sum (read as signed 32-bit)."""
    return np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.float64) / scale_for(clip_range, n_members)
