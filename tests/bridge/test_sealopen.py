"""broker_bridge.sealopen: the in-place SealedBox open agrees with PyNaCl's and refuses what PyNaCl refuses."""

from __future__ import annotations

import os

import numpy as np
import pytest
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, SealedBox

from broker_bridge.sealopen import ALIGN, PEEK_BYTES, SEAL_BYTES, seal_open


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


def _at(offset: int | None):
    """A ``place`` that asks for ``offset`` to be aligned and keeps what it was shown."""
    seen: list[bytes] = []

    def place(head: memoryview) -> int | None:
        seen.append(bytes(head))
        return offset

    return place, seen


@pytest.mark.parametrize("n", [0, 1, 63, PEEK_BYTES, PEEK_BYTES + 1, 300_001])
def test_a_placed_open_gives_the_same_plaintext_with_the_asked_offset_aligned(n: int) -> None:
    """The step-by-step open (nonce, shared key, secretbox) agrees with libsodium's crypto_box_seal_open, shows
    ``place`` the plaintext's true first bytes, and puts the offset it names on an ALIGN-byte boundary."""
    key = PrivateKey.generate()
    msg = os.urandom(n)
    ct = SealedBox(key.public_key).encrypt(msg)
    for offset in (0, 1, 3, 37, 5000):
        place, seen = _at(offset)
        out = seal_open(memoryview(b"FLE\x01" + ct)[4:], key, place=place)
        assert bytes(out) == msg and out.readonly
        assert seen == [msg[:PEEK_BYTES]]
        if n:  # an empty plaintext has no address to place
            assert (np.frombuffer(out, np.uint8).ctypes.data + offset) % ALIGN == 0
    place, _ = _at(None)
    assert bytes(seal_open(ct, key, place=place)) == msg


@pytest.mark.parametrize("where", [0, 31, 40, 60, -1])
def test_a_placed_open_refuses_a_flipped_bit_anywhere_another_key_and_a_zero_ephemeral_key(where: int) -> None:
    key, other = PrivateKey.generate(), PrivateKey.generate()
    ct = bytearray(SealedBox(key.public_key).encrypt(b"delta" * 100))
    place, _ = _at(7)
    bad = bytearray(ct)
    bad[where] ^= 0x01
    with pytest.raises(CryptoError):
        seal_open(bad, key, place=place)
    with pytest.raises(CryptoError):
        seal_open(ct, other, place=place)
    zero_epk = bytes(32) + bytes(ct[32:])  # a low-order point: libsodium refuses the all-zero shared secret
    with pytest.raises(CryptoError):
        seal_open(zero_epk, key, place=place)
    with pytest.raises(CryptoError):
        seal_open(zero_epk, key)


@pytest.mark.parametrize("n", [1, 63, 64, 4 * 100_003])
def test_a_tail_placed_open_puts_the_last_bytes_on_a_boundary_without_reading_any_first(n: int) -> None:
    """``tail``: the plaintext's last ``tail`` bytes start on an ALIGN-byte boundary, the plaintext unchanged, and
    ``place`` is never asked (nothing read before the box authenticates); a tail that does not fit the plaintext
    leaves the placement to ``place``."""
    key = PrivateKey.generate()
    msg = os.urandom(n)
    ct = SealedBox(key.public_key).encrypt(msg)
    for tail in sorted(t for t in {0, 1, 4, n // 2, n} if t <= n):
        place, seen = _at(3)
        out = seal_open(memoryview(b"FLE\x01" + ct)[4:], key, place=place, tail=tail)
        assert bytes(out) == msg and out.readonly and seen == []
        assert (np.frombuffer(out, np.uint8).ctypes.data + n - tail) % ALIGN == 0
    place, seen = _at(3)
    out = seal_open(ct, key, place=place, tail=n + 1)  # more than there is: placed from the first bytes
    assert bytes(out) == msg and seen == [msg[:PEEK_BYTES]]
    assert (np.frombuffer(out, np.uint8).ctypes.data + 3) % ALIGN == 0


@pytest.mark.parametrize("where", [0, 31, 40, 60, -1])
def test_a_tail_placed_open_refuses_a_flipped_bit_another_key_and_a_zero_ephemeral_key(where: int) -> None:
    key, other = PrivateKey.generate(), PrivateKey.generate()
    ct = bytearray(SealedBox(key.public_key).encrypt(b"delta" * 100))
    bad = bytearray(ct)
    bad[where] ^= 0x01
    for blob, k in ((bad, key), (ct, other), (bytes(32) + bytes(ct[32:]), key)):
        with pytest.raises(CryptoError):
            seal_open(blob, k, tail=100)
