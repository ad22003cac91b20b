"""broker_bridge.sealopen: the in-place SealedBox open agrees with PyNaCl's and refuses what PyNaCl refuses."""

from __future__ import annotations

import os

import pytest
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, SealedBox

from broker_bridge.sealopen import SEAL_BYTES, seal_open


def test_opens_what_pynacl_seals_also_from_a_view_into_a_larger_buffer() -> None:
    key = PrivateKey.generate()
    for n in (0, 1, 4096, 300_001):
        msg = os.urandom(n)
        ct = SealedBox(key.public_key).encrypt(msg)
        assert len(ct) == n + SEAL_BYTES == n + 48
        assert bytes(seal_open(ct, key)) == msg
        framed = b"FLE\x01" + ct  # as it arrives: the sealed box after a 4-byte prefix, read in place
        out = seal_open(memoryview(framed)[4:], key)
        assert bytes(out) == msg and out.readonly


@pytest.mark.parametrize("where", [0, 40, -1])
def test_a_flipped_bit_anywhere_does_not_open(where: int) -> None:
    key = PrivateKey.generate()
    ct = bytearray(SealedBox(key.public_key).encrypt(b"delta" * 100))
    ct[where] ^= 0x01
    with pytest.raises(CryptoError):
        seal_open(ct, key)


def test_another_key_and_short_input_do_not_open() -> None:
    key, other = PrivateKey.generate(), PrivateKey.generate()
    ct = SealedBox(key.public_key).encrypt(b"x")
    with pytest.raises(CryptoError):
        seal_open(ct, other)
    with pytest.raises(CryptoError):
        seal_open(ct[: SEAL_BYTES - 1], key)
