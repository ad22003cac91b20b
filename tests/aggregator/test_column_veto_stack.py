"""The column veto on every input column at once (veto19k) against the per-column code it replaced, kept here as
the oracle: one distance matrix per column (``x @ x.T`` on the column's ``n × out`` rows), one subset search per
column (the search as of c05a17c: every subset's diameter, f = 1's in three maxima, scanned in combinations order
with the :data:`aggregator.mda.TIE` rule), two diameters per column, and the vetoed columns summed one at a time.

The decisions (the whole-vector subset, every column's vetoes) and the step must be equal (``==``,
``array_equal``), not close: the vetoes are threshold decisions, and the attack suite's numbers were measured with
the per-column code. The distances may differ from the oracle's by float32 rounding only (since mda19n the centre
is a float32 mean and the whole vector's Gram matrix the sum of the first layer's columns' and the rest's): they are
held to a direct float64 computation, and a stack's matrices to each one's own call, bit for bit. The buffers are random, with duplicated slots
(ties in the distances and in the farthest pair), an all-equal column (every distance 0), and columns pushed so
that the veto fires in some and not in others (asserted, so a test that vetoes nothing cannot pass vacuously);
K = 3, 10 and 101 kept, f = 1 and f = 2.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from aggregator import mda
from aggregator.scaled_sum import Scaled
from aggregator.strategies import aggregate
from broker_bridge.quantised import Int8Delta, quantise

# -- the oracle: the per-column code before veto19k ---------------------------------------------------------------


def _distances(rows: np.ndarray) -> np.ndarray:
    x = np.asarray(rows, np.float32)
    centre = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    x = x - centre
    gram = (x @ x.T).astype(np.float64)
    sq = np.diag(gram)
    out = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0))
    np.fill_diagonal(out, 0.0)
    return out


def _diameter(upper: np.ndarray, idx: tuple[int, ...]) -> float:
    if len(idx) < 2:
        return 0.0
    at = np.asarray(idx)
    return float(upper[np.ix_(at, at)].max())


def _drop_one_diameters(upper: np.ndarray) -> list[float]:
    n = upper.shape[0]
    a, b = np.unravel_index(int(np.argmax(upper)), upper.shape)
    out = [float(upper[a, b])] * n
    for i in (int(a), int(b)):
        rest = np.delete(np.delete(upper, i, axis=0), i, axis=1)
        out[i] = float(rest.max()) if rest.size else 0.0
    return out[::-1]


def _subset(dist: np.ndarray, f: int) -> tuple[int, ...]:
    n = dist.shape[0]
    f = mda.left_out(f, n)
    best: tuple[int, ...] = tuple(range(n))
    best_diameter = np.inf
    upper = np.triu(dist, 1)
    diameters = (
        _drop_one_diameters(upper)
        if f == 1 and n >= 2
        else [_diameter(upper, c) for c in itertools.combinations(range(n), n - f)]
    )
    for combo, diameter in zip(itertools.combinations(range(n), n - f), diameters):
        if not best_diameter < np.inf or diameter < best_diameter * (1.0 - mda.TIE):
            best, best_diameter = combo, diameter
    return best


def _column_vetoes(
    deltas: Sequence[Mapping[str, np.ndarray]], keep: tuple[int, ...], name: str, f: int, gate: float
) -> dict[int, list[int]]:
    x = aggregate._stack(deltas, name, [1.0] * len(deltas))
    out: dict[int, list[int]] = {}
    for j in range(x.shape[2]):
        dist = _distances(np.ascontiguousarray(x[:, :, j]))
        own = _subset(dist, f)
        dropped = [i for i in keep if i not in own]
        upper = np.triu(dist, 1)
        if dropped and _diameter(upper, keep) * (1.0 - mda.TIE) > gate * _diameter(upper, own):
            out[j] = dropped
    return out


def _vetoed_step(step, deltas, keep, coefficients, name, vetoes):
    if not vetoes:
        return step
    x = aggregate._stack(deltas, name, [1.0] * len(deltas))
    tensor = np.array(step[name], np.float32, copy=True)
    for j, dropped in vetoes.items():
        col = np.zeros(tensor.shape[0], np.float32)
        for i, c in zip(keep, coefficients):
            if i not in dropped:
                col += np.float32(c) * x[i, :, j]
        tensor[:, j] = col
    return {**step, name: tensor}


# -- the buffers --------------------------------------------------------------------------------------------------


def buffer(n: int, out: int, columns: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``n`` deltas of a ``out × columns`` first layer and a bias: honest noise at a random scale; slot 1 a copy of
    slot 0 and slot 3 of slot 2 (ties, and the farthest pair twice where they are far); column 0 equal in every
    slot (all distances 0); the last slot pushed far in the first third of the columns (the veto fires there) and
    slot 2 in the next few, by less."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-4, 1)
    w = (rng.standard_normal((n, out, columns)) * scale).astype(np.float32)
    w[1] = w[0]
    if n > 3:
        w[3] = w[2]
    w[:, :, 0] = w[0, :, 0]
    third = max(1, columns // 3)
    w[n - 1, :, 1 : 1 + third] += np.float32(6 * scale)
    w[2, :, 1 + third : 4 + third] += np.float32(1.5 * scale)
    bias = (rng.standard_normal((n, out)) * scale).astype(np.float32)
    return [{"w": w[i], "b": bias[i]} for i in range(n)]


CASES = [  # (received n, f, columns, seed): K = n − f kept
    *(
        (n, f, columns, seed)
        for n, f, columns in ((4, 1, 12), (5, 2, 12), (11, 1, 40), (12, 2, 40), (102, 1, 24))
        for seed in range(3)
    ),
    (103, 2, 2, 0),  # C(103, 2) = 5,253 subsets a search: one buffer, one gate (~2 s)
]


@pytest.mark.parametrize("n, f, columns, seed", CASES)
def test_the_vetoes_and_the_step_are_the_per_column_ones(n: int, f: int, columns: int, seed: int) -> None:
    deltas = buffer(n, 7 + 5 * seed, columns, 100 * n + seed)
    rng = np.random.default_rng(seed)
    whole = aggregate.mda_keep(deltas, f)
    flat = np.stack([np.concatenate([d["w"].reshape(-1), d["b"]]) for d in deltas])
    assert whole == _subset(_distances(flat), f)  # the whole-vector subset: the old code's
    other = tuple(sorted(rng.choice(n, size=n - f, replace=False).tolist()))  # any kept subset, not only MDA's
    gates = (1.0, 1.2, 3.0) if n < 100 or f == 1 else (1.2,)
    fired = 0
    for keep in (whole, other):
        coefficients = rng.uniform(0.01, 0.3, size=len(keep)).tolist()
        step = aggregate.linear_combination([deltas[i] for i in keep], coefficients)
        for gate in gates:
            expected = _column_vetoes(deltas, keep, "w", f, gate)
            got = aggregate.column_vetoes(deltas, keep, "w", f, gate)
            assert got == expected
            assert list(got) == list(expected)  # the same columns in the same order
            fired += len(expected)
            want = _vetoed_step(step, deltas, keep, coefficients, "w", expected)
            have = aggregate.vetoed_step(step, deltas, keep, coefficients, "w", got)
            assert np.array_equal(have["w"], want["w"]) and np.array_equal(have["b"], want["b"])
    assert 0 < fired < 2 * len(gates) * columns  # the veto fires in some columns, not in all


def _direct(x: np.ndarray) -> np.ndarray:
    """Pairwise distances of the rows of ``x`` (``… × n × d``) in float64, one difference at a time."""
    x = np.asarray(x, np.float64)
    return np.sqrt(((x[..., :, None, :] - x[..., None, :, :]) ** 2).sum(axis=-1))


def _close(dist: np.ndarray, x: np.ndarray) -> None:
    """``dist`` is ``x``'s rows' distances up to float32 rounding (of the Gram matrix, at the scale of the largest)."""
    want = _direct(x)
    scale = want.max(axis=(-2, -1), keepdims=True)
    assert np.all(np.abs(dist - want) <= 1e-5 * want + 2e-3 * scale)


@pytest.mark.parametrize("seed", range(8))
def test_stacked_distances_are_each_columns_own(seed: int) -> None:
    """A stack's matrices bit for bit each one's own call; all of them the float64 distances up to rounding, and
    the same subsets as the oracle's distances."""
    rng = np.random.default_rng(seed)
    n, out, columns = (int(rng.choice(v)) for v in ((3, 4, 7, 9, 11, 15, 17, 101), (1, 2, 7, 64, 258), (1, 5, 128)))
    x = (rng.standard_normal((columns, n, out)) * 10.0 ** rng.uniform(-4, 2)).astype(np.float32)
    x[:, n - 1] = x[:, 0]
    stack = mda.distances(x)
    assert stack.shape == (columns, n, n) and stack.dtype == np.float64
    _close(stack, x)
    for j in range(columns):
        assert np.array_equal(mda.distances(x[j]), stack[j])  # and one matrix alone (the whole-vector MDA's call)
        assert stack[j, 0, n - 1] == 0.0  # a duplicated slot: exactly 0
        assert mda.subset(stack[j], 1) == _subset(_distances(x[j]), 1)
    scratch = x.copy()
    assert np.array_equal(mda.distances(scratch, overwrite=True), stack)  # centred in place: the same distances


@pytest.mark.parametrize("n", [3, 7, 11, 15, 63])
def test_a_padded_gram_product_is_the_plain_one_bit_for_bit(n: int) -> None:
    """n % 4 == 3 slots get one zero row more for their Gram product (mda.padded: OpenBLAS's fast path); each
    entry of the product must be the plain ``x @ x.T``'s, bit for bit, for a whole-vector matrix, for a stack and
    for a strided view (the column veto's columns), or the padding would change the decisions' rounding."""
    assert mda.padded(n) == n + 1 and mda.padded(n + 1) == n + 1 and mda.padded(n - 1) == n - 1
    rng = np.random.default_rng(n)
    for shape in ((n, 100_003), (n, 1), (33, n, 258)):
        x = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 2)).astype(np.float32)
        full = np.zeros((*shape[:-2], n + 1, shape[-1]), np.float32)
        full[..., :n, :] = x
        plain = np.matmul(x, np.swapaxes(x, -1, -2))
        assert np.array_equal(mda.gram(full, n), plain)
        _close(mda.distances(x), x)  # (mda.distances pads a copy)
    wide = np.zeros((n + 1, 5 * 300 + 7), np.float32)  # rows of a first layer 300 × 5 laid out column by column
    wide[:n] = rng.standard_normal((n, wide.shape[1]))
    view = wide[:, : 5 * 300].reshape(n + 1, 5, 300).transpose(1, 0, 2)
    copy = np.ascontiguousarray(view[:, :n])
    assert np.array_equal(mda.gram(view, n), np.matmul(copy, np.swapaxes(copy, 1, 2)))


def test_centre_subtracts_the_float32_mean() -> None:
    """mda.centre subtracts the rows' float32 mean: the centred rows' mean is 0 up to rounding, the differences
    between rows are kept up to rounding, a stack's matrices are each one's own bit for bit (a non-last axis is
    added in order), and the padding rows past n stay zero."""
    rng = np.random.default_rng(3)
    for shape in ((11, 5000), (40, 11, 64), (101, 300)):
        x = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 3, size=shape[-1]) + 5.0).astype(np.float32)
        n = shape[-2]
        full = np.zeros((*shape[:-2], mda.padded(n) + 1, shape[-1]), np.float32)
        full[..., :n, :] = x
        mda.centre(full, n)
        centred = full[..., :n, :].astype(np.float64)
        big = np.abs(x).max(axis=-2, keepdims=True)
        assert np.all(np.abs(centred.mean(axis=-2, keepdims=True)) <= 1e-6 * big)
        moved = centred - (x - x.astype(np.float64).mean(axis=-2, keepdims=True))
        assert np.all(np.abs(moved) <= 1e-6 * big)
        assert not full[..., n:, :].any()
        if len(shape) == 3:
            for j in range(shape[0]):
                assert np.array_equal(mda.centre(x[j].copy(), n), full[j, :n])


@pytest.mark.parametrize("seed", range(10))
def test_subsets_are_each_matrixs_search(seed: int) -> None:
    """Stacks of random matrices, some with every distance equal (all 0, all 1: every subset ties), some with the
    farthest pair at the last slot, and the lower triangle off (only i < j may be read)."""
    rng = np.random.default_rng(seed)
    n = int(rng.choice((3, 4, 6, 11, 30)))
    m = 9
    rows = rng.normal(size=(m, n, 4)).astype(np.float32)
    rows[1] = 0.0
    rows[2, n - 1] += 50.0
    rows[3, 0] += 50.0
    rows[4, n - 2] = rows[4, n - 1]
    dist = mda.distances(rows)
    dist[5] = np.where(np.eye(n, dtype=bool), 0.0, 1.0)
    dist = dist + np.tril(rng.uniform(0.0, 1e-3, size=(m, n, n)), -1)
    for f in (1, 2) if n < 30 else (1,):
        inside, diameters = mda.subsets(dist, f)
        for k in range(m):
            expected = _subset(dist[k], f)
            assert tuple(np.flatnonzero(inside[k]).tolist()) == expected == mda.subset(dist[k], f)
            assert diameters[k] == mda.diameter(dist[k], expected)
        keep = rng.random(n) < 0.6
        got = mda.diameters(dist, keep)
        for k in range(m):
            assert got[k] == mda.diameter(dist[k], tuple(np.flatnonzero(keep).tolist()))


def test_all_equal_slots_leave_out_the_last():
    """Every distance 0: no subset is smaller beyond the tie, so the first in combinations order wins, the one
    without slot n − 1 (as the per-column search: its first subset, never replaced)."""
    inside, diameters = mda.subsets(np.zeros((2, 5, 5)), 1)
    assert inside.tolist() == [[True, True, True, True, False]] * 2 and diameters.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("n", [3, 4, 5, 8, 13])
def test_near_ties_follow_the_scan(n: int) -> None:
    """Two to four far pairs at levels within a few :data:`aggregator.mda.TIE` of each other (or equal): a
    later subset wins only below the best so far by more than TIE, so the farthest pair's ends, the last slot and
    which of them ties decide the subset. 400 matrices a size, each against the scan of the per-column search."""
    rng = np.random.default_rng(n)
    levels = 1.0 - mda.TIE * np.array([0.0, 0.0, 0.5, 1.2, 1.7, 2.5, 4.0])
    dist = rng.uniform(0.0, 0.9, size=(400, n, n))
    for k in range(len(dist)):  # two to four far pairs, at near-tie levels
        for _ in range(int(rng.integers(2, 5))):
            i, j = sorted(rng.choice(n, size=2, replace=False))
            dist[k, i, j] = rng.choice(levels)
    dist = np.triu(dist, 1)
    dist = dist + np.swapaxes(dist, 1, 2)
    inside, diameters = mda.subsets(dist, 1)
    outcomes = set()
    for k in range(len(dist)):
        expected = _subset(dist[k], 1)
        assert tuple(np.flatnonzero(inside[k]).tolist()) == expected == mda.subset(dist[k], 1)
        assert diameters[k] == mda.diameter(dist[k], expected)
        outcomes.add(next(i for i in range(n) if i not in expected))
    assert len(outcomes) >= 3  # not the same slot left out every time
    if n >= 5:  # f = 2: only the subsets leaving the farthest pair's ends out are measured (mda._search)
        inside, diameters = mda.subsets(dist[:100], 2)
        pairs = set()
        for k in range(100):
            expected = _subset(dist[k], 2)
            assert tuple(np.flatnonzero(inside[k]).tolist()) == expected
            assert diameters[k] == mda.diameter(dist[k], expected)
            pairs.add(tuple(i for i in range(n) if i not in expected))
        assert len(pairs) >= 3


def test_clipped_and_int8_deltas_give_the_per_column_vetoes_and_step() -> None:
    """A buffer as the reduce meets it: some deltas clipped (a scale read lazily), some int8 updates (int8 values and
    block steps times a factor), the rest plain; the columns are read through the same ``_fill`` as the old stack."""
    rng = np.random.default_rng(7)
    plain = buffer(11, 9, 20, 77)
    deltas: list[Mapping[str, np.ndarray]] = []
    for i, d in enumerate(plain):
        if i % 3 == 1:
            deltas.append(Scaled(d, 0.37 + 0.1 * i))
        elif i % 3 == 2:
            deltas.append(Int8Delta({k: quantise(v, rng) for k, v in d.items()}, 0.8))
        else:
            deltas.append(d)
    keep = aggregate.mda_keep(deltas, 1)
    flat = np.stack(
        [np.concatenate([aggregate._stack([d], k, [1.0])[0].reshape(-1) for k in ("w", "b")]) for d in deltas]
    )
    assert keep == _subset(_distances(flat), 1)
    coefficients = [0.1] * len(keep)
    step = aggregate.linear_combination([deltas[i] for i in keep], coefficients)
    fired = 0
    for gate in (1.0, 1.2):
        expected = _column_vetoes(deltas, keep, "w", 1, gate)
        assert aggregate.column_vetoes(deltas, keep, "w", 1, gate) == expected
        want = _vetoed_step(step, deltas, keep, coefficients, "w", expected)
        have = aggregate.vetoed_step(step, deltas, keep, coefficients, "w", expected)
        assert np.array_equal(have["w"], want["w"])
        fired += len(expected)
    assert 0 < fired < 40
