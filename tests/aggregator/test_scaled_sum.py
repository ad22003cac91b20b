"""The reduce's fused clip and cache-blocked sum (aggregator.scaled_sum) give the same floats as scaled copies
added one after another, and the numbers a hand-worked clip gives."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator import robust
from aggregator.scaled_sum import BLOCK, Scaled, weighted_sum_into
from aggregator.strategies import aggregate


def _buffer(seed: int, shapes: dict[str, tuple[int, ...]], k: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {n: (rng.standard_normal(s) * rng.uniform(0.1, 3)).astype(np.float32) for n, s in shapes.items()}
        for _ in range(k)
    ]


def _the_old_way(deltas, bound, coefficients):
    """What the reduce did before: a scaled float32 copy of each clipped delta, then ``add_scaled`` one by one."""
    out = {}
    for name in deltas[0]:
        acc = np.zeros(deltas[0][name].shape, np.float32)
        for d, c in zip(deltas, coefficients):
            norm = robust.l2_norm(d)
            x = d[name] if norm <= bound else (d[name] * np.float32(bound / norm)).astype(np.float32)
            robust.add_scaled(acc, x, c)
        out[name] = acc
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_the_fused_mean_is_bit_for_bit_the_sum_of_scaled_copies(seed):
    """Tensors smaller than, equal to and longer than one block (with a ragged last block), half the deltas
    clipped: the same bytes as before the fusion."""
    shapes = {"w": (3, BLOCK // 2 + 7), "b": (BLOCK,), "s": (), "tiny": (5,)}
    deltas = _buffer(seed, shapes, 10)
    norms = [robust.l2_norm(d) for d in deltas]
    bound = float(np.median(norms))
    coefficients = [0.1 * (1 + i / 7) for i in range(10)]
    clipped = [robust.clip(d, bound, n)[0] for d, n in zip(deltas, norms)]
    assert sum(isinstance(c, Scaled) for c in clipped) == 5  # those above the median: no copy made
    fused = aggregate.linear_combination(clipped, coefficients)
    old = _the_old_way(deltas, bound, coefficients)
    for name in shapes:
        assert fused[name].dtype == np.float32 and fused[name].shape == shapes[name]
        assert fused[name].tobytes() == old[name].tobytes()


def test_the_median_of_clipped_deltas_is_bit_for_bit_the_median_of_their_copies():
    deltas = _buffer(3, {"w": (4, 300), "b": (9,)}, 7)
    norms = [robust.l2_norm(d) for d in deltas]
    bound = float(np.median(norms))
    clipped = [robust.clip(d, bound, n)[0] for d, n in zip(deltas, norms)]
    copies = [{k: np.array(v) for k, v in c.items()} for c in clipped]  # reading a Scaled gives the old copy
    c = [1 / 7] * 7
    lazy, eager = aggregate.robust_combination(clipped, c, "median"), aggregate.robust_combination(copies, c, "median")
    for name in lazy:
        assert lazy[name].tobytes() == eager[name].tobytes()


def test_a_clipped_delta_reads_as_its_scaled_copy_and_the_sum_matches_a_hand_worked_case():
    """Δ = (3, 4) has norm 5; clipped to 2.5 it is (1.5, 2); with c = 0.5 beside (1, 1) at c = 2:
    0.5·(1.5, 2) + 2·(1, 1) = (2.75, 3)."""
    d = {"v": np.array([3.0, 4.0], np.float32)}
    clipped, scale = robust.clip(d, 2.5)
    assert scale == 0.5 and isinstance(clipped, Scaled) and list(clipped) == ["v"] and len(clipped) == 1
    np.testing.assert_array_equal(clipped["v"], np.array([1.5, 2.0], np.float32))
    assert robust.clip(d, 6.0)[1] == 1.0  # within the bound: not scaled
    step = aggregate.linear_combination([clipped, {"v": np.ones(2, np.float32)}], [0.5, 2.0])
    np.testing.assert_array_equal(step["v"], np.array([2.75, 3.0], np.float32))
    acc = np.ones(2, np.float32)
    weighted_sum_into(acc, [(np.array([3.0, 4.0], np.float32), 0.5, 0.5)])  # 1 + 0.5·(0.5·x)
    np.testing.assert_array_equal(acc, np.array([1.75, 2.0], np.float32))
