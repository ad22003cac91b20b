"""Minimum-diameter averaging (MDA): the mean of the ``n − f`` slots that lie closest together.

Why (issue 14, RELIABILITY.md): with three slots per version the coordinate-wise median still lets the one
dissenting slot pick, in every coordinate, which honest value wins, and a backdoor's pull adds up version
after version (20-30 points of backdoor success from one site in four). MDA takes the whole-vector view
instead: of all subsets of ``n − f`` slots it keeps the one whose largest pairwise L2 distance (its diameter)
is smallest, and averages it (El-Mhamdi, Guerraoui and Rouault, "Distributed Momentum for Byzantine-resilient
Stochastic Gradient Descent", ICLR 2021, after Rousseeuw's minimum-volume estimators, 1985). It tolerates
``f`` arbitrary slots of ``n ≥ 2f + 1``: a slot far from the others, as a backdoored delta is from honest ones
trained from the same model, is left out whole; one that stays near them moves the mean no further than an
honest slot could. fedline leaves ``f = 1`` slot out by default (``[strategy] mda_f``): with one update
per site per buffer (issue 14) that is "no single site steers a version".

How many slots a version waits for, and how many it sums (since 1 Dec 2026): ``buffer_size`` is FedBuff's K, the
slots a version *sums* (Nguyen et al. 2022: ``Δ̄ = (1/K) Σ f(s_i) Δ_i``); MDA's ``n`` is the slots *received*, of
which it keeps ``n − f``. So under MDA a buffer waits for ``K + f`` arrivals (at most one per site) and keeps K:
each kept slot weighs exactly its FedBuff ``f(s)/K`` (issue 14's fair share, literally), a left-out one 0, and a
version moves as far as the plain mean's when every slot agrees (K kept slots of ``f(s)/K``), so the step is not
shortened. With fewer sites enrolled than ``buffer_size + f``, all of them are waited for and ``f`` left out
(:func:`sizes`: four enrolled sites, ``f = 1``: four received, K = 3 kept at 1/3 each). Before, K counted the
arrivals and the kept slots were scaled up by ``n/(n − f)``: at four sites the same arithmetic (a kept slot at
1/3), named "1/(K − 1)".

The search is exact: every subset of ``n − f`` slots, ``C(n, f)`` of them (``MAX_SUBSETS`` at most, checked
when the configuration is read). The math is pure functions (:func:`distances`, :func:`subset`; for a stack of
matrices, the column veto's one per input column, :func:`distances` and :func:`subsets`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import numpy as np

MAX_SUBSETS = 10_000  # C(K, f) subsets searched per version, at most
TIE = 1e-5  # diameters within this fraction of each other are a tie (float32 rounding): the first subset wins


def check(f: int, k: int) -> None:
    """Refuse an ``f`` MDA cannot use with ``k`` slots summed per version, so ``k + f`` received (the error names
    the key)."""
    if f < 1:
        raise ValueError(f"mda_f must be at least 1 (the slots left out of each version), got {f}")
    n = k + min(f, max(k - 1, 0))  # the arrivals a full buffer holds (sizes(): f is never more than k − 1)
    if math.comb(n, f) > MAX_SUBSETS:
        raise ValueError(
            f"mda_f = {f} with buffer_size = {k} means {n} slots received and C({n}, {f}) = {math.comb(n, f)} "
            f'subsets per version (at most {MAX_SUBSETS}): lower mda_f or buffer_size, or use robust = "median"'
        )


def left_out(f: int, n: int) -> int:
    """The slots MDA leaves out of ``n`` received: ``f``, lowered to ``(n − 1) // 2`` so a majority is kept (MDA
    needs ``n ≥ 2f + 1``; keeping fewer than half would let a colluding minority be the tightest subset)."""
    return max(0, min(f, (n - 1) // 2))


def sizes(f: int, k: int, n_sites: int, min_kept: int = 1) -> tuple[int, int]:
    """``(arrivals, kept)`` of a full buffer: wait for ``K + f`` updates (one per site), keep ``K``.

    ``k`` is the configured ``buffer_size``. With enough sites a buffer waits for ``k + f`` and keeps ``k``;
    with fewer it waits for every enrolled site and leaves ``f`` out (K = ``n_sites − f``); ``f`` is lowered so
    that a majority is kept (:func:`left_out`), is never more than ``k − 1`` (``K ≥ f + 1``), and never leaves
    fewer than ``min_kept`` (``[strategy] min_sites``: no version combines fewer distinct sites, so three
    enrolled sites with ``min_sites = 3`` leave nothing out rather than sum two, each of which could read the
    other's delta from the step)."""
    f = min(f, max(k - 1, 0))
    arrivals = min(k + f, n_sites)
    f = kept_at_least(left_out(f, arrivals), arrivals, min_kept)
    kept = min(k, arrivals - f)
    return kept + f, kept


def kept_at_least(f: int, n: int, min_kept: int) -> int:
    """``f`` lowered so that at least ``min_kept`` of ``n`` received slots are kept (0 if ``n ≤ min_kept``)."""
    return max(0, min(f, n - min_kept))


def padded(n: int) -> int:
    """The rows a Gram product over ``n`` slots is given: ``n``, and one zero row more when ``n % 4 == 3``.

    Why: OpenBLAS's float32 ``syrk``/``sgemm`` (NumPy's wheel, 0.3.31, one thread) takes its slow edge path on a
    remainder of three rows: 11 rows of 100k cost ~2.4 ms, 12 rows (one of them zero) ~1.4 ms, and so 7 vs 8, 15
    vs 16, 63 vs 64 (bench/column_veto.py, BENCHMARKS.md "mda19n"). Each entry of the product is its own sum over
    the columns, so a zero row changes no bit of the others (tests/aggregator/test_column_veto_stack.py holds the
    padded product to the plain ``x @ x.T``, so a BLAS that rounds them differently fails there first). Other
    remainders gain nothing measurable, and 101 rows padded to 104 lose, so only three is padded."""
    return n + 1 if n % 4 == 3 else n


def distances(rows: np.ndarray, overwrite: bool = False, n: int | None = None) -> np.ndarray:
    """The ``n × n`` matrix of pairwise L2 distances between the rows of ``rows`` (``n × d``), from one Gram
    matrix of the rows less their mean (:func:`centre`, :func:`centred_distances`). ``overwrite``: centre a
    float32 ``rows`` in place instead of a copy (the caller's matrix is scratch). ``n``: only the first ``n`` rows
    are slots, the rest zero padding (:func:`padded`; left as they are and out of the result).

    ``rows`` may be a stack ``m × n × d``: then the ``m`` matrices, in one call each step, and each bit for bit
    the one its own ``n × d`` gives (:func:`mean` adds the rows in order; :func:`gram`). Why: the
    column veto measures every input column of the first layer (128 in ``bench/aggregator.py``), and a call per
    column cost ~2.5 ms per update at K = 10 (BENCHMARKS.md, veto19k)."""
    x = np.asarray(rows, np.float32)
    n = x.shape[-2] if n is None else n
    if overwrite and x is rows:
        return centred_distances(centre(x, n), n)
    full = np.zeros((*x.shape[:-2], padded(n), x.shape[-1]), np.float32)  # a copy costs the same, padded
    full[..., :n, :] = x[..., :n, :]
    return centred_distances(centre(full, n), n)


def centre(rows: np.ndarray, n: int) -> np.ndarray:
    """``rows`` (float32, ``… × m × d``, a view will do) with its first ``n`` rows less their :func:`mean`, in place
    (the rest, zero padding, untouched); returns ``rows``. Any centre gives the same distances; centring near the
    mean keeps the float32 product's rounding at the scale of the distances, not of the rows (a common drift of
    every delta would otherwise cancel in ``‖a‖² + ‖b‖² − 2⟨a, b⟩``)."""
    if n:
        rows[..., :n, :] -= mean(rows[..., i, :] for i in range(n))[..., None, :]
    return rows


def mean(rows: Iterable[np.ndarray]) -> np.ndarray:
    """The float32 mean of equally shaped arrays (:func:`centre`'s rows), added in order into a copy of the first
    and divided by their number: a stack's matrices and a matrix cut into blocks get each one's own bits. ``rows``
    may be a generator that fills each row as it is read (``aggregate._rows``: added while still in cache).
    float32: its rounding moves the centre by a few ulps, which changes no distance beyond float32 rounding;
    NumPy's float64 mean cost ~0.9 ms of 11 rows of 100k, this ~0.3 (BENCHMARKS.md "mda19n")."""
    each = iter(rows)
    out = np.array(next(each), np.float32, copy=True)
    count = 1
    for row in each:
        out += row
        count += 1
    out /= np.float32(count)
    return out


def gram(rows: np.ndarray, n: int) -> np.ndarray:
    """The float32 Gram matrix of the first ``n`` rows of ``rows`` (``… × m × d``; rows past ``n`` zero,
    :func:`padded`): one ``matmul``, the same BLAS product (syrk) on each matrix of a stack as on one, and on a
    strided view (a row stride past ``d``) as on a copy, without the copy."""
    return np.matmul(rows, np.swapaxes(rows, -1, -2))[..., :n, :n]


def from_gram(gram: np.ndarray) -> np.ndarray:
    """The pairwise L2 distances (float64) of rows whose Gram matrix is ``gram`` (``… × n × n``, float32 or
    float64): ``‖a − b‖² = ‖a‖² + ‖b‖² − 2⟨a, b⟩``, clipped at 0 (rounding), the diagonal exactly 0."""
    g = gram.astype(np.float64)
    sq = np.diagonal(g, axis1=-2, axis2=-1).copy()
    g *= 2.0  # exact: then (‖a‖² + ‖b‖²) − 2⟨a, b⟩ in that order, in place (a stack's temporaries are large)
    out = sq[..., :, None] + sq[..., None, :]
    out -= g
    np.sqrt(np.maximum(out, 0.0, out=out), out=out)
    diagonal = np.arange(out.shape[-1])
    out[..., diagonal, diagonal] = 0.0
    return out


def centred_distances(rows: np.ndarray, n: int) -> np.ndarray:
    """The distances between the first ``n`` rows of ``rows`` (already centred, :func:`centre`; rows past ``n``
    zero): :func:`from_gram` of :func:`gram`."""
    return from_gram(gram(rows, n))


def diameter(dist: np.ndarray, idx: tuple[int, ...]) -> float:
    """The largest pairwise distance among the slots ``idx`` (0 for fewer than two)."""
    return _diameter(np.triu(dist, 1), idx)


def _diameter(upper: np.ndarray, idx: tuple[int, ...]) -> float:
    """:func:`diameter` from ``upper`` = the distance matrix's strict upper triangle (zeros on and below the
    diagonal), ``idx`` ascending: the maximum of ``dist[i, j]`` over the pairs ``i < j`` of ``idx``, the same value
    as a loop over the pairs (a maximum rounds nothing), in one NumPy call. Why: a pair loop in Python cost about
    0.5 ms per 100 slots squared, and the column veto runs a subset search per input column of the first layer
    (128 of them in ``bench/scale.py``): 171 ms of aggregator CPU per update at K = 100 (BENCHMARKS.md)."""
    if len(idx) < 2:
        return 0.0
    at = np.asarray(idx)
    return float(upper[np.ix_(at, at)].max())


def subset(dist: np.ndarray, f: int) -> tuple[int, ...]:
    """The ``n − f`` indices whose largest pairwise distance is smallest (the first in index order on a tie);
    ``f`` lowered by :func:`left_out` (a buffer closed early may hold fewer than ``2f + 1``)."""
    n = dist.shape[0]
    f = left_out(f, n)
    upper = np.triu(dist, 1)
    if f == 1:
        out, found = _drop_one(upper[None])
        if np.isfinite(found[0]):  # (never otherwise: the deltas are finite and norm-bounded)
            return tuple(i for i in range(n) if i != out[0])
    return _search(upper, f)


def _search(upper: np.ndarray, f: int) -> tuple[int, ...]:
    """:func:`subset` by scanning every subset of ``n − f`` in :func:`itertools.combinations` order, from ``upper``
    (:func:`_diameter`). A subset that holds the farthest pair ``(a, b)`` has that pair's distance as its diameter,
    exactly (a maximum rounds nothing), and never wins after the first (no later diameter is smaller): only the
    subsets leaving ``a`` or ``b`` out are measured, ``2n − 3`` of ``C(n, 2)`` at f = 2. They are enumerated by the
    slots they leave out: the subsets in combinations order leave out the ``f``-sets in reverse combinations
    order. Why: the column veto runs a search per input column; at f = 2 and K = 100 one measured all 5,151
    subsets in ~320 ms (41 s a version over 128 columns)."""
    n = upper.shape[0]
    if n == 0:
        return ()
    a, b = np.unravel_index(int(np.argmax(upper)), upper.shape)
    far = float(upper[a, b])
    best_out: tuple[int, ...] = ()
    best_diameter = np.inf
    for out in reversed(list(itertools.combinations(range(n), f))):
        if a in out or b in out:
            inside = np.ones(n, bool)
            inside[list(out)] = False
            diameter = _diameter(upper, tuple(np.flatnonzero(inside).tolist()))
        else:
            diameter = far
        if not best_diameter < np.inf or diameter < best_diameter * (1.0 - TIE):
            best_out, best_diameter = out, diameter
    return tuple(i for i in range(n) if i not in best_out)


def subsets(dist: np.ndarray, f: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`subset` of each matrix of a stack ``dist`` (``m × n × n``), bit for bit: ``(inside, diameters)``,
    ``inside[k, i]`` whether slot ``i`` is in ``subset(dist[k], f)`` and ``diameters[k]`` that subset's
    :func:`diameter`. At f = 1 (the default) in a few NumPy calls over the whole stack (:func:`_drop_one`); at
    f ≥ 2 one search per matrix. Why: the column veto searches every input column of the first layer."""
    m, n = dist.shape[0], dist.shape[-1]
    f = left_out(f, n)
    upper = np.triu(dist, 1)
    if f == 0:
        return np.ones((m, n), bool), upper.max(axis=(1, 2), initial=0.0)
    if f == 1:
        out, diameters = _drop_one(upper)
        if np.isfinite(diameters).all():
            return np.arange(n)[None, :] != out[:, None], diameters
    inside = np.zeros((m, n), bool)
    for k in range(m):
        inside[k, list(subset(dist[k], f))] = True
    return inside, _masked_max(upper, inside)


def diameters(dist: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """:func:`diameter` of each matrix of a stack ``dist`` (``m × n × n``) over the slots ``inside[k]`` (``m × n``
    booleans, or ``n`` for all alike), bit for bit (a maximum rounds nothing)."""
    return _masked_max(np.triu(dist, 1), np.broadcast_to(inside, dist.shape[:2]))


def _masked_max(upper: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """The largest ``upper[k, i, j]`` with ``i`` and ``j`` both ``inside[k]``, per matrix ``k`` (0 for fewer than
    two slots: ``upper`` is 0 on and below its diagonal, and a distance is never below 0). The rows and columns
    of the slots outside are set to 0 for one pass of ``max`` and put back (``upper`` is the caller's scratch):
    no masked copy of the stack (128 × 101 × 101 float64 at K = 100)."""
    outside = ~inside
    transposed = np.swapaxes(upper, 1, 2)
    rows, columns = upper[outside], transposed[outside]
    upper[outside] = 0.0
    transposed[outside] = 0.0
    try:
        return upper.max(axis=(1, 2), initial=0.0)
    finally:
        upper[outside] = rows
        transposed[outside] = columns


def _drop_one(upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`subset` at f = 1 of each matrix of ``upper`` (``m × n × n``, each the strict upper triangle of a
    distance matrix, :func:`_diameter`; ``n ≥ 3``): ``(out, diameters)``, the slot each leaves out and the
    diameter of the rest.

    A subset without slot ``i`` keeps the farthest pair ``(a, b)`` (``a < b``, the first in row order), so its
    diameter is that pair's distance ``D`` unless ``i`` is ``a`` or ``b``: two maxima more, not ``n``. The
    search's scan (combinations order: the subset without slot ``n − 1`` first, without slot 0 last; a later one
    wins only if its diameter is below the best's by more than :data:`TIE`) then reduces to three steps: start
    without ``n − 1`` (diameter ``D``, or ``d_b`` if ``b = n − 1``); ``D`` never wins; without ``b`` wins if
    ``d_b < D (1 − TIE)``; then without ``a`` if ``d_a`` is below the best so far by more than ``TIE``."""
    m, n = upper.shape[0], upper.shape[-1]
    a, b = np.divmod(upper.reshape(m, -1).argmax(axis=1), n)
    far = upper[np.arange(m), a, b]
    slots = np.arange(n)[None, :]
    d_a = _masked_max(upper, slots != a[:, None])
    d_b = _masked_max(upper, slots != b[:, None])
    take_b = (b == n - 1) | (d_b < far * (1.0 - TIE))
    best = np.where(take_b, d_b, far)
    out = np.where(take_b, b, n - 1)
    take_a = d_a < best * (1.0 - TIE)
    found = np.where(np.isfinite(far), np.where(take_a, d_a, best), np.nan)  # NaN: the callers search one by one
    return np.where(take_a, a, out), found
