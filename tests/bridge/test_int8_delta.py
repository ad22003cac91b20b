"""The int8 delta kept int8 (``quantised.Int8Delta``): norm, clipping factor and accumulation from the int8 blocks.

Every expected number below is worked out by hand from the definition (value = q · step of its block, times
the delta's factor), on one tensor of 1,030 values: a full block of 1,024 and a partial block of 6. The steps
are powers of two, so every product is exact and the by-hand values are the float32 results, bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from broker_bridge import quantised
from broker_bridge.errors import WireError
from broker_bridge.quantised import Int8Delta

STEPS = np.array([0.5, 0.25], np.float32)  # block 0, block 1


def _q() -> np.ndarray:
    q = np.zeros(1030, np.int8)
    q[0], q[1], q[1023] = 3, -2, 127  # block 0: 1.5, -1.0, 63.5
    q[1024], q[1029] = -1, 5  # block 1: -0.25, 1.25
    return q


def _delta() -> Int8Delta:
    read = quantised.read({"w": _q(), "w#scale": STEPS}, "int8")
    assert isinstance(read, Int8Delta)
    return read


def test_the_norm_comes_from_the_int8_blocks_as_worked_by_hand() -> None:
    d = _delta()
    # 1.5² + 1² + 63.5² + 0.25² + 1.25² = 2.25 + 1 + 4032.25 + 0.0625 + 1.5625
    assert d.norm() == math.sqrt(4037.125)
    # per block: 0.5² (9 + 4 + 16129) + 0.25² (1 + 25), the same total
    np.testing.assert_array_equal(quantised.block_sums_of_squares(_q()), [16142.0, 26.0])
    assert d.scaled(0.5).norm() == 0.5 * math.sqrt(4037.125)
    assert d.scaled(-2.0).norm() == 2.0 * math.sqrt(4037.125)


def test_the_sums_of_squares_are_exact_at_the_largest_block() -> None:
    q = np.full(3 * 1024, -127, np.int8)  # also three blocks in one chunk
    np.testing.assert_array_equal(quantised.block_sums_of_squares(q), [1024 * 127**2] * 3)  # 16,516,096 < 2^24


def test_the_sums_of_squares_hold_minus_128_and_cross_chunks_exactly() -> None:
    # -128 decodes (the encoder never sends it): 1,024 · 128² = 2^24 per block, still exact in the int16 squares
    # and int32 sums; 300 blocks span three chunks of SQUARE_BLOCKS, then a partial block of 7
    n_full = 300
    values = np.array([(-128, 127, -1, 0, 5)[b % 5] for b in range(n_full)], np.int8)
    q = np.concatenate([np.repeat(values, 1024), np.full(7, -128, np.int8)])
    want = [1024.0 * int(v) ** 2 for v in values] + [7.0 * 128**2]
    assert n_full > 2 * quantised.SQUARE_BLOCKS
    np.testing.assert_array_equal(quantised.block_sums_of_squares(q), want)
    assert want[0] == 2.0**24


def test_indexing_and_dequantise_into_give_the_hand_values_times_the_factor() -> None:
    half = _delta().scaled(0.5)
    want = np.zeros(1030, np.float32)
    want[[0, 1, 1023, 1024, 1029]] = [0.75, -0.5, 31.75, -0.125, 0.625]
    np.testing.assert_array_equal(half["w"], want)
    row = np.full(1030, np.nan, np.float32)
    half.dequantise_into(row, "w")
    np.testing.assert_array_equal(row, want)
    assert list(half) == ["w"] and half.shapes == {"w": (1030,)}


def test_add_to_accumulates_coefficient_times_factor_times_step_times_q() -> None:
    acc = np.ones(1030, np.float32)
    _delta().scaled(0.5).add_to(acc, "w", 2.0)  # acc += 2 · 0.5 · (q · s): the delta itself
    want = np.ones(1030, np.float32)
    want[[0, 1, 1023, 1024, 1029]] = [2.5, 0.0, 64.5, 0.75, 2.25]
    np.testing.assert_array_equal(acc, want)


def test_a_tensor_of_many_chunks_accumulates_like_its_dequantised_values() -> None:
    """Beyond one chunk (64 blocks) and with a partial block: the same as float64 arithmetic on q · s."""
    rng = np.random.default_rng(5)
    n = 70 * 1024 + 300
    q = rng.integers(-127, 128, n).astype(np.int8)
    steps = rng.uniform(0, 0.01, quantised.n_blocks(n)).astype(np.float32)
    d = quantised.read({"w": q, "w#scale": steps}, "int8")
    assert isinstance(d, Int8Delta)
    exact = q.astype(np.float64) * np.repeat(steps.astype(np.float64), 1024)[:n]
    acc = np.zeros(n, np.float32)
    d.add_to(acc, "w", 0.3)
    np.testing.assert_allclose(acc, 0.3 * exact, rtol=1e-6, atol=1e-9)
    assert d.norm() == pytest.approx(float(np.sqrt(np.dot(exact, exact))), rel=1e-12)


def test_a_nan_step_is_still_named_by_the_fast_range_check() -> None:
    with pytest.raises(WireError) as err:
        quantised.read({"w": _q(), "w#scale": np.array([0.5, np.nan], np.float32)}, "int8")
    assert err.value.reason == "encoding" and "NaN" in err.value.detail
    with pytest.raises(WireError) as err:
        quantised.read({"w": _q(), "w#scale": np.array([0.5, np.inf], np.float32)}, "int8")
    assert "NaN or infinity" in err.value.detail


def test_a_tensor_of_one_partial_block_takes_the_same_arithmetic() -> None:
    """A bias of three values, step 0.5: values 1.5, -1.0, 63.5; norm and accumulation by hand."""
    d = quantised.read({"b": np.array([3, -2, 127], np.int8), "b#scale": np.array([0.5], np.float32)}, "int8")
    assert isinstance(d, Int8Delta)
    assert d.norm() == math.sqrt(1.5**2 + 1.0 + 63.5**2)
    acc = np.array([1.0, 1.0, 1.0], np.float32)
    d.scaled(0.5).add_to(acc, "b", 2.0)
    np.testing.assert_array_equal(acc, [2.5, 0.0, 64.5])
    empty = quantised.read({"e": np.zeros(0, np.int8), "e#scale": np.zeros(0, np.float32)}, "int8")
    assert isinstance(empty, Int8Delta) and empty.norm() == 0.0


def test_combine_sums_the_deltas_by_hand_and_as_adding_them_one_by_one() -> None:
    """Σ c_i Δ_i of the by-hand delta: 2 · (it) + 0.5 · (it at factor 0.5); then many chunks, K = 12, against
    float64 sums of q · s (within float32 rounding) and the same bits for the same inputs."""
    d = _delta()
    out = quantised.combine([d, d.scaled(0.5)], [2.0, 0.5], "w", (1030,))
    want = np.zeros(1030, np.float32)  # 2 · x + 0.25 · x = 2.25 · x (powers of two: exact)
    want[[0, 1, 1023, 1024, 1029]] = [3.375, -2.25, 142.875, -0.5625, 2.8125]
    np.testing.assert_array_equal(out, want)
    bias = quantised.read({"b": np.array([3, -2, 127], np.int8), "b#scale": np.array([0.5], np.float32)}, "int8")
    assert isinstance(bias, Int8Delta)  # less than one block: 1 · x + 0.5 · x with x = 1.5, -1.0, 63.5
    np.testing.assert_array_equal(quantised.combine([bias, bias], [1.0, 0.5], "b", (3,)), [2.25, -1.5, 95.25])
    rng = np.random.default_rng(8)
    n = 70 * 1024 + 300  # more than one chunk of the K rows, and a partial block
    deltas = []
    for i in range(12):
        q = rng.integers(-127, 128, n).astype(np.int8)
        steps = rng.uniform(0, 0.01, quantised.n_blocks(n)).astype(np.float32)
        read = quantised.read({"w": q, "w#scale": steps}, "int8")
        assert isinstance(read, Int8Delta)
        deltas.append(read.scaled(0.5 + i / 24))
    coefficients = list(rng.uniform(0, 1, 12))
    exact = np.zeros(n)
    for delta, c in zip(deltas, coefficients):
        q, steps = (np.asarray(x, np.float64) for x in delta._parts["w"])
        exact += c * delta.factor * q * np.repeat(steps, 1024)[:n]
    got = quantised.combine(deltas, coefficients, "w", (n,))
    np.testing.assert_allclose(got, exact, rtol=0, atol=4e-7 * np.abs(exact).max())
    np.testing.assert_array_equal(quantised.combine(deltas, coefficients, "w", (n,)), got)  # deterministic
    with pytest.raises(ValueError, match="one coefficient per delta"):
        quantised.combine(deltas, coefficients[:3], "w", (n,))


def test_dequantise_into_with_a_coefficient_writes_the_scaled_row_by_hand() -> None:
    """A row of the median's stack: 0.5 · (the delta at factor 0.5) = 0.25 · q · s, in one pass."""
    row = np.full(1030, np.nan, np.float32)
    _delta().scaled(0.5).dequantise_into(row, "w", 0.5)
    want = np.zeros(1030, np.float32)
    want[[0, 1, 1023, 1024, 1029]] = [0.375, -0.25, 15.875, -0.0625, 0.3125]
    np.testing.assert_array_equal(row, want)
