"""The selection-network median gives the very floats the sort-based median gave (bit for bit)."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator import median_network, robust


def sorted_median(stacked: np.ndarray) -> np.ndarray:
    """The median as robust.median_of computed it before the network: sort the stack, take the middle."""
    n = stacked.shape[0]
    s = np.sort(stacked, axis=0)
    mid = s[n // 2] if n % 2 else s[n // 2 - 1 : n // 2 + 1].mean(axis=0, dtype=np.float32)
    return np.array(mid, np.float32)


@pytest.mark.parametrize("k", [*range(3, 17), 17, median_network.MAX_K])
def test_every_0_1_column_gets_its_median(k: int) -> None:
    """Exhaustive over 0/1 columns: by the 0-1 principle (Knuth 5.3.4), a comparator network that puts
    the middle of every 0/1 input in place does so for every input."""
    columns = ((np.arange(1 << k) >> np.arange(k)[:, None]) & 1).astype(np.float32)  # (k, 2**k): every 0/1 column
    assert np.array_equal(robust.median_of(columns.copy()), sorted_median(columns))


@pytest.mark.parametrize("k", [3, 4, 5, 9, 10, 11, 16, 17, 20])
def test_bit_identical_to_the_sorted_median_on_random_deltas_and_ties(k: int) -> None:
    rng = np.random.default_rng(k)
    # 70,003 columns: more than one block, a ragged last block; a 2-d tensor shape as the model has
    stacked = (rng.standard_normal((k, 7, 10_001)) * 10.0 ** rng.integers(-8, 3, (k, 7, 10_001))).astype(np.float32)
    stacked[:, 0, :500] = 0.25  # every row equal
    stacked[: k // 2 + 1, 1, :500] = -3.0  # a majority tie at the middle
    stacked[:, 2, :500] = rng.integers(-2, 3, (k, 500)).astype(np.float32)  # many ties among few values
    want = sorted_median(stacked)
    got = robust.median_of(stacked.copy())
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_the_median_of_three_worked_by_hand() -> None:
    stacked = np.array([[1.0, -5.0, 2.5], [3.0, 0.5, 2.5], [2.0, 4.0, -1.0]], np.float32)
    assert robust.median_of(stacked).tolist() == [2.0, 0.5, 2.5]
    four = np.array([[1.0], [4.0], [2.0], [10.0]], np.float32)  # middle values 2 and 4: their mean
    assert robust.median_of(four).tolist() == [3.0]


def test_a_wider_stack_than_the_network_still_takes_the_sort() -> None:
    k = median_network.MAX_K + 1
    stacked = np.random.default_rng(0).standard_normal((k, 1000)).astype(np.float32)
    assert np.array_equal(robust.median_of(stacked.copy()), sorted_median(stacked))
    with pytest.raises(ValueError, match="median network"):
        median_network.network(k)
