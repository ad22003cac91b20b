"""Unbiased stochastic rounding, and the generator its randomness comes from: the one home of both.

Two quantisers use it: secure aggregation's fixed point in Z_{2^32}
(:mod:`broker_bridge.secagg.quantise`) and the optional 8-bit update encoding
(:mod:`broker_bridge.quantised`). Each rounds a real ``v`` to ``floor(v)`` or
``floor(v) + 1``, up with probability ``frac(v)``, so ``E[round(v)] = v``:
the rounding adds zero-mean noise of less than one step instead of a bias that
would accumulate over sites and versions.

Why a private generator, seeded from the OS CSPRNG: the rounding must be
independent of everything else in the process (torch's and numpy's global
generators can be seeded or replayed by other code, e.g. a test or a library
calling ``np.random.seed``), and two processes must never share a stream. The
rounding needs no secrecy for privacy (it is applied to a delta that is
already DP-noised: post-processing), only independence for unbiasedness.
"""

from __future__ import annotations

import secrets

import numpy as np


def private_rng() -> np.random.Generator:
    """A fresh PCG64 generator seeded with 128 bits from the OS CSPRNG (``secrets``), never global state."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def stochastic_round(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``floor(v + u)``, ``u ~ U[0, 1)`` per element: ``floor(v) + 1`` with probability ``frac(v)``, float64."""
    v = np.asarray(v, dtype=np.float64)
    return np.floor(v + rng.random(v.shape))
