"""The protocol's building blocks, checked against numbers worked out by hand or by an
independent implementation (cryptography's ChaCha20, raw X25519)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from nacl.bindings import crypto_scalarmult, randombytes_buf_deterministic
from nacl.public import PrivateKey

from broker_bridge.secagg import prg, quantise, seeds, shamir


# --------------------------------------------------------------------------- Shamir
def test_reconstruct_a_polynomial_worked_by_hand() -> None:
    # f(x) = 5 + 3x + 2x^2: f(1) = 10, f(2) = 19, f(3) = 32, f(4) = 49
    assert shamir.reconstruct({1: 10, 2: 19, 3: 32}) == 5
    assert shamir.reconstruct({2: 19, 3: 32, 4: 49}) == 5
    # Lagrange at 0 for x = 1, 2, 3 is (3, -3, 1)
    assert shamir.lagrange_at_zero([1, 2, 3]) == {1: 3, 2: shamir.PRIME - 3, 3: 1}


def test_split_gives_points_of_one_degree_t_minus_1_polynomial() -> None:
    secret = int.from_bytes(hashlib.sha256(b"b_i").digest(), "big")
    ys = shamir.split(secret, 5, 2)  # a line: equal steps between consecutive shares
    steps = {(ys[i + 1] - ys[i]) % shamir.PRIME for i in range(4)}
    assert len(steps) == 1
    assert (ys[0] - next(iter(steps))) % shamir.PRIME == secret  # f(0) = f(1) - slope
    ys = shamir.split(secret, 7, 4)
    for subset in ([1, 2, 3, 4], [4, 5, 6, 7], [1, 3, 5, 7]):
        assert shamir.reconstruct({x: ys[x - 1] for x in subset}) == secret
    # t - 1 shares give another value (with overwhelming probability)
    assert shamir.reconstruct({x: ys[x - 1] for x in (1, 2, 3)}) != secret


def test_field_prime_holds_any_32_byte_seed() -> None:
    assert shamir.PRIME > 2**256 - 1
    assert shamir.from_bytes(shamir.to_bytes(2**256 - 1)) == 2**256 - 1
    with pytest.raises(ValueError, match="field element"):
        shamir.from_bytes((shamir.PRIME).to_bytes(33, "big"))
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(1, 3, 4)


# --------------------------------------------------------------------------- quantisation
def test_scale_and_error_bound_worked_by_hand() -> None:
    # n = 5, R = 1: scale = (2^31 - 1 - 5) / 5; bound = 5 / scale = 25 / (2^31 - 6)
    assert quantise.scale_for(1.0, 5) == (2**31 - 6) / 5
    assert quantise.error_bound(1.0, 5) == pytest.approx(25 / (2**31 - 6), rel=1e-12)


def test_a_full_cohort_at_the_range_edge_does_not_overflow() -> None:
    n, r = 50, 0.25
    for sign in (1.0, -1.0):
        total = np.zeros(3, dtype=np.uint32)
        for _ in range(n):
            q, clamped = quantise.quantise(np.full(3, sign * 10 * r), r, n)  # clamped to +-R
            assert clamped == 3
            total += q
        as_signed = total.view(np.int32).astype(np.int64)
        assert np.all(np.abs(as_signed) <= 2**31 - 1)
        assert np.all(np.sign(as_signed) == sign)  # no wrap-around
        assert np.allclose(quantise.dequantise_sum(total, r, n), sign * n * r, atol=quantise.error_bound(r, n))


def test_stochastic_rounding_is_unbiased_and_within_one_step() -> None:
    n, r = 2, 1.0
    scale = quantise.scale_for(r, n)
    x = np.full(200_000, 0.3 / scale + 7 / scale)  # 7.3 quantisation steps
    q, _ = quantise.quantise(x, r, n, np.random.default_rng(0))
    ints = q.view(np.int32)
    assert set(np.unique(ints)) == {7, 8}
    assert abs(ints.mean() - 7.3) < 0.005  # P(8) = 0.3; sd of the mean ~ 0.001


def test_quantise_refuses_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        quantise.quantise(np.array([0.0, np.nan]), 1.0, 3)


# --------------------------------------------------------------------------- PRG and seeds
def test_prg_is_libsodium_chacha20_with_the_seed_as_key() -> None:
    # the mask is defined as libsodium's randombytes_buf_deterministic (IETF ChaCha20 keyed by the seed,
    # nonce "LibsodiumDRG"); prg computes it with OpenSSL: compare with libsodium's own C code, at lengths
    # that end inside a 64-byte block, span many blocks, and are empty
    for seed in (bytes(range(32)), bytes(32), b"\xff" * 32):
        for n in (0, 1, 15, 1000, 100_003):
            expected = np.frombuffer(randombytes_buf_deterministic(4 * n, seed), dtype="<u4")
            assert np.array_equal(prg.mask(seed, n), expected), (seed[:2], n)
    assert not np.array_equal(prg.mask(bytes(31) + b"\x01", 1000), prg.mask(bytes(32), 1000))
    with pytest.raises(ValueError, match="32 bytes"):
        prg.mask(b"\x00" * 4, 10)  # no short seeds
    with pytest.raises(ValueError, match="mask length"):
        prg.mask(bytes(32), -1)
    with pytest.raises(ValueError, match="mask length"):
        prg.mask(bytes(32), 2**36 + 1)  # past the 32-bit block counter: the keystream would repeat


def test_pair_seed_is_symmetric_and_bound_to_the_cohort() -> None:
    a, b = PrivateKey.generate(), PrivateKey.generate()
    c1, c2 = b"\x01" * 32, b"\x02" * 32
    s_ab = seeds.pair_seed(bytes(a), bytes(b.public_key), c1, "site-a", "site-b")
    s_ba = seeds.pair_seed(bytes(b), bytes(a.public_key), c1, "site-b", "site-a")
    assert s_ab == s_ba
    # recompute from the definition: BLAKE2b keyed by X25519(a, B) over cohort | a | b
    dh = crypto_scalarmult(bytes(a), bytes(b.public_key))
    data = c1 + b"\x00\x06site-a" + b"\x00\x06site-b"
    assert s_ab == hashlib.blake2b(data, key=dh, person=b"fedline-sa-pair", digest_size=32).digest()
    assert seeds.pair_seed(bytes(a), bytes(b.public_key), c2, "site-a", "site-b") != s_ab
    with pytest.raises(ValueError, match="low-order"):
        seeds.pair_seed(bytes(a), bytes(32), c1, "site-a", "site-z")
