"""The issue-14 probe's arithmetic (tests/hostile/mda_probe.py), on numbers worked by hand."""

from __future__ import annotations

import numpy as np

from tests.hostile.mda_probe import cosine_distances, normalised, rules, score_left_out, tensor_distances


def test_tensor_distances_per_tensor_per_column_and_whole() -> None:
    # slot a: w = [[3, 0], [0, 0]], b = [1]; slot b: w = [[0, 0], [0, 4]], b = [1]
    a = {"w": np.array([[3.0, 0.0], [0.0, 0.0]], np.float32), "b": np.array([1.0], np.float32)}
    b = {"w": np.array([[0.0, 0.0], [0.0, 4.0]], np.float32), "b": np.array([1.0], np.float32)}
    d = tensor_distances([a, b])
    assert d["w[:,0]"][0][1] == 3.0  # column 0: (3, 0) against (0, 0)
    assert d["w[:,1]"][0][1] == 4.0  # column 1: (0, 0) against (0, 4)
    assert d["w"][0][1] == 5.0  # the whole tensor: √(9 + 16)
    assert d["b"][0][1] == 0.0
    assert d["all"][1][0] == 5.0


def test_normalised_divides_by_the_median_pairwise_distance() -> None:
    # three slots, pairwise 1, 2, 4: the median is 2
    d = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 4.0], [2.0, 4.0, 0.0]])
    assert np.allclose(normalised(d), d / 2.0)


def test_cosine_distance_from_norms_and_distance() -> None:
    # a = (1, 0), b = (0, 2): ‖a − b‖ = √5, cos = 0, so 1 − cos = 1; a = (1, 0), c = (2, 0): cos = 1, so 0
    d = np.array([[0.0, np.sqrt(5.0), 1.0], [np.sqrt(5.0), 0.0, np.sqrt(8.0)], [1.0, np.sqrt(8.0), 0.0]])
    out = cosine_distances(d, [1.0, 2.0, 2.0])
    assert abs(out[0, 1] - 1.0) < 1e-12 and abs(out[0, 2]) < 1e-12
    assert abs(out[1, 2] - 1.0) < 1e-12  # b = (0, 2), c = (2, 0): orthogonal


def test_the_layer_wise_sum_gives_a_small_tensor_a_whole_vote() -> None:
    # w: slot 2 far (10) from slots 0, 1 (1 apart); b (one value): slot 0 far (1) from slots 1, 2 (0.1 apart)
    # whole vector: d01 = √(1 + 1) ≈ 1.41, d02 = √(100 + 1), d12 = √(100 + 0.01): MDA on it leaves slot 2 out;
    # normalised per tensor (w's median 10, b's median 1): d01 = 0.1 + 1 = 1.1, d02 = 1 + 1 = 2, d12 = 1 + 0.1 = 1.1
    # MDA on the sum: subsets {0,1}: 1.1, {0,2}: 2, {1,2}: 1.1; of three slots, f = 1 keeps two: {0,1} first on the tie
    w = np.array([[0.0, 1.0, 10.0], [1.0, 0.0, 10.0], [10.0, 10.0, 0.0]])
    b = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.1], [1.0, 0.1, 0.0]])
    whole = np.sqrt(w**2 + b**2)
    r = rules({"dist": {"w": w.tolist(), "b": b.tolist(), "all": whole.tolist()}})
    assert np.allclose(r["tensor L2 sum"], [[0, 1.1, 2.0], [1.1, 0, 1.1], [2.0, 1.1, 0]])
    assert np.allclose(r["tensor L2 max"], [[0, 1.0, 1.0], [1.0, 0, 1.0], [1.0, 1.0, 0]])


def test_score_left_out_by_sum_and_by_krum() -> None:
    # four slots: 0, 1, 2 pairwise 1 apart except d(1, 2) = 3; slot 3 at 2 from each of the others
    # summed distances: 0: 1 + 1 + 2 = 4, 1: 1 + 3 + 2 = 6, 2: 1 + 3 + 2 = 6, 3: 6: the first largest is slot 1
    # Krum (n − f − 2 = 1 nearest, squared): 0: 1, 1: 1, 2: 1, 3: 4: slot 3
    d = np.array([[0, 1, 1, 2], [1, 0, 3, 2], [1, 3, 0, 2], [2, 2, 2, 0]], np.float64)
    assert score_left_out(d) == {"sum": 1, "krum": 3}
