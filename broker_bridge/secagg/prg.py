"""Mask expansion: ChaCha20 keyed by a 256-bit seed (libsodium's randombytes_buf_deterministic).

Never numpy's seeded generators: they are not cryptographic, and a 32-bit seed (as some
SecAgg implementations use) can be brute-forced in minutes, which unmasks the update.
"""

from __future__ import annotations

import numpy as np
from nacl.bindings import randombytes_buf_deterministic

SEED_BYTES = 32


def mask(seed: bytes, length: int) -> np.ndarray:
    """``length`` uniform uint32 values from ``seed`` (the same seed always gives the same mask)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    if length < 0:
        raise ValueError("mask length must be non-negative")
    return np.frombuffer(randombytes_buf_deterministic(4 * length, seed), dtype="<u4")
