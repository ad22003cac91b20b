"""Shamir t-of-n secret sharing over the prime field GF(2^256 + 297).

The prime is the smallest above 2^256, so any 32-byte seed is a field element and a share
is 33 bytes. Coefficients come from the OS CSPRNG (``os.urandom``): t - 1 shares of a
secret are uniformly distributed and say nothing about it. Share ``k`` is the polynomial
at ``x = k`` (1-based index of the member in the cohort's sorted member list).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

PRIME = 2**256 + 297
SHARE_BYTES = 33
_COEFF_BYTES = 40


def split(secret: int, n: int, t: int) -> list[int]:
    """Shares of ``secret`` at x = 1..n; any ``t`` of them reconstruct it."""
    if not 0 <= secret < PRIME:
        raise ValueError("secret is not a field element")
    if not 1 <= t <= n:
        raise ValueError(f"threshold {t} must be in 1..{n}")
    # t - 1 coefficients from one OS read: 40-byte integers reduced mod p (bias below 2^-63)
    pool = os.urandom(_COEFF_BYTES * (t - 1))
    coeffs = [int.from_bytes(pool[i : i + _COEFF_BYTES], "big") % PRIME for i in range(0, len(pool), _COEFF_BYTES)]
    coeffs.reverse()
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in coeffs:  # Horner with one reduction at the end: x is small, y grows by log2(x) bits a step
            y = y * x + c
        shares.append((y * x + secret) % PRIME)
    return shares


def lagrange_at_zero(xs: Iterable[int]) -> dict[int, int]:
    """Coefficients l_k with f(0) = sum_k l_k f(x_k), for distinct nonzero x's.

    Computed once per set of answering members and reused for every secret they share.
    """
    xs = list(xs)
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share indices must be distinct and nonzero")
    out = {}
    for k in xs:
        num, den = 1, 1
        for m in xs:
            if m != k:
                num = num * m % PRIME
                den = den * (m - k) % PRIME
        out[k] = num * pow(den, -1, PRIME) % PRIME
    return out


def reconstruct(shares: Mapping[int, int], coeffs: Mapping[int, int] | None = None) -> int:
    """The secret from shares ``{x: y}`` (exactly the threshold's worth, or more of one polynomial)."""
    coeffs = coeffs or lagrange_at_zero(shares)
    return sum(coeffs[x] * y for x, y in shares.items()) % PRIME


def to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def from_bytes(raw: bytes) -> int:
    if len(raw) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(raw)}")
    y = int.from_bytes(raw, "big")
    if y >= PRIME:
        raise ValueError("share is not a field element")
    return y
