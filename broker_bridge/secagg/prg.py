"""Mask expansion: ChaCha20 keyed by a 256-bit seed.

The mask is exactly libsodium's ``randombytes_buf_deterministic(4 * length, seed)``: the IETF
ChaCha20 keystream (RFC 8439) under the key ``seed``, nonce ``"LibsodiumDRG"``, block counter 0.
It is computed with OpenSSL's ChaCha20 (through ``cryptography``), which produces the same bytes
(tests/secagg/test_secagg_math.py compares the two) about 3.5 times faster than the libsodium
build PyNaCl ships on this machine: expanding the masks is most of the aggregator's unmasking.

Never numpy's seeded generators: they are not cryptographic, and a 32-bit seed (as some
SecAgg implementations use) can be brute-forced in minutes, which unmasks the update.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEED_BYTES = 32
# libsodium's randombytes_buf_deterministic nonce; OpenSSL's 16-byte ChaCha20 IV is the 32-bit
# little-endian block counter (0) followed by the 96-bit nonce
_IV = bytes(4) + b"LibsodiumDRG"
_MAX_LENGTH = 2**36  # 2^32 ChaCha20 blocks of 64 bytes: the IETF counter's range, in uint32 values
# the plaintext the keystream is XORed with, kept from one mask to the next: a fresh zero buffer per
# mask costs more than the cipher (the kernel zeroes new pages); grows to the largest mask asked for
_zeros = b""


def mask(seed: bytes, length: int) -> np.ndarray:
    """``length`` uniform uint32 values from ``seed`` (the same seed always gives the same mask)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    if not 0 <= length <= _MAX_LENGTH:
        raise ValueError(f"mask length must be in [0, 2^36], got {length}")
    global _zeros
    if len(_zeros) < 4 * length:
        _zeros = bytes(4 * length)
    stream = Cipher(algorithms.ChaCha20(seed, _IV), mode=None).encryptor()
    return np.frombuffer(stream.update(memoryview(_zeros)[: 4 * length]), dtype="<u4")
