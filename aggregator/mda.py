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
per site per buffer (issue 14) that is "no single site steers a version". The kept slots share the step
(:func:`aggregator.strategies.aggregate.mda_combination`: ``n`` times their mean, so a version moves as far
as the plain mean's when every slot agrees): a kept slot's coefficient is ``f(s)/(K − f)``, 1/2 at K = 3,
1/3 at K = 4, and a slot can be kept only by lying within the spread of the others. ``[strategy] mda_scale =
"k"`` keeps each kept slot at its FedBuff ``f(s)/K`` instead (issue 14's literal fair share); it cost the clean
model 0.006 (K = 3) and 0.012 (the default K, RELIABILITY.md) of ROC AUC, so it is not the default.

The search is exact: every subset of ``n − f`` slots, ``C(n, f)`` of them (``MAX_SUBSETS`` at most, checked
when the configuration is read). The math is pure functions (:func:`distances`, :func:`subset`).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

MAX_SUBSETS = 10_000  # C(K, f) subsets searched per version, at most
TIE = 1e-5  # diameters within this fraction of each other are a tie (float32 rounding): the first subset wins


def check(f: int, k: int) -> None:
    """Refuse an ``f`` MDA cannot use with buffers of ``k`` slots (the error names the key)."""
    if f < 1:
        raise ValueError(f"mda_f must be at least 1 (the slots left out of each version), got {f}")
    if math.comb(k, f) > MAX_SUBSETS:
        raise ValueError(
            f"mda_f = {f} with buffer_size = {k} means C({k}, {f}) = {math.comb(k, f)} subsets per version "
            f'(at most {MAX_SUBSETS}): lower mda_f or buffer_size, or use robust = "median"'
        )


def distances(rows: np.ndarray) -> np.ndarray:
    """The ``n × n`` matrix of pairwise L2 distances between the rows of ``rows`` (``n × d``), from one Gram
    matrix of the rows less their mean: ``‖a − b‖² = ‖a‖² + ‖b‖² − 2⟨a, b⟩`` (centring leaves the distances as
    they are and keeps the float32 product's rounding at the scale of the distances, not of the rows)."""
    x = np.asarray(rows, np.float32)
    x = x - x.mean(axis=0, dtype=np.float64).astype(np.float32)
    gram = (x @ x.T).astype(np.float64)
    sq = np.diag(gram)
    out = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0))
    np.fill_diagonal(out, 0.0)
    return out


def subset(dist: np.ndarray, f: int) -> tuple[int, ...]:
    """The ``n − f`` indices whose largest pairwise distance is smallest (the first in index order on a tie).

    ``f`` is lowered to ``(n − 1) // 2`` if larger: MDA needs ``n ≥ 2f + 1``, and keeping fewer than half the
    slots would let a colluding minority be the tightest subset."""
    n = dist.shape[0]
    f = max(0, min(f, (n - 1) // 2))
    best: tuple[int, ...] = tuple(range(n))
    best_diameter = np.inf
    for combo in itertools.combinations(range(n), n - f):
        diameter = max((dist[i, j] for i, j in itertools.combinations(combo, 2)), default=0.0)
        if not best_diameter < np.inf or diameter < best_diameter * (1.0 - TIE):
            best, best_diameter = combo, diameter
    return best
