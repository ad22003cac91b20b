"""Centered clipping (CClip): each slot's distance from the previous aggregate clipped to a radius, then averaged.

Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust Optimization", ICML 2021 (PMLR 139:
5311-5319), the aggregation rule CC (their eq. (CC), Algorithm 2): with ``v_0`` the previous round's aggregate
(the server's history) and ``x_i`` the ``n`` received vectors,

    v_{l+1} = v_l + (1/n) Σ_i (x_i − v_l) · min(1, τ / ‖x_i − v_l‖),   l = 0, …, L − 1,

and the aggregate is ``v_L``. A vector within ``τ`` of the centre enters as it is; one farther away enters only
as the point at distance ``τ`` along its direction, so one slot moves the aggregate from the centre by at most
``τ/n``, however far it went. The paper notes that one iteration suffices when the centre is good (the previous
aggregate, with worker momentum); fedline's default is ``L = 1`` (``[strategy] cclip_iters``).

What fedline chooses where the paper leaves a constant (why, RELIABILITY.md): the radius is not a fixed ``τ`` but
``cclip_tau`` times the median of the ``n`` distances ``‖x_i − v_0‖`` of the version (:func:`radius`): deltas
shrink by orders of magnitude as a model converges and differ between federations, so a fixed radius is either
no bound or clips every honest slot; the median over slots held one per site is an honest slot's distance while
most of the buffer is honest. The previous aggregate ``v_0`` is the previous version's step (zero before the
first version). How it combines with FedBuff's staleness: :func:`aggregator.strategies.aggregate.cclip_combination`.

Each slot's share of the aggregate (what the lineage records, :func:`shares`): with ``L = 1`` the aggregate is
``(1 − S/n) v_0 + Σ_i (s_i / n) x_i``, ``s_i = min(1, τ/‖x_i − v_0‖)`` and ``S = Σ s_i``, so each slot weighs
``s_i / n ≤ 1/n``: the fair share holds. With ``L > 1`` a slot near the moving centre can weigh more than
``1/n`` (the centre drifts towards it); :func:`shares` gives the exact coefficients either way.

The math is pure functions on rows (``n × d`` arrays): :func:`clip_factors`, :func:`radius`, :func:`iterate`.
"""

from __future__ import annotations

import numpy as np


def clip_factors(rows: np.ndarray, center: np.ndarray, tau: float) -> np.ndarray:
    """``s_i = min(1, τ / ‖x_i − v‖)`` per row (1 for a row at the centre; 0 for every row other than the centre
    when ``τ = 0``)."""
    dist = np.linalg.norm(np.asarray(rows, np.float64) - np.asarray(center, np.float64)[None, :], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(dist > tau, tau / np.where(dist > 0, dist, 1.0), 1.0)


def radius(rows: np.ndarray, center: np.ndarray, scale: float = 1.0) -> float:
    """fedline's τ: ``scale`` times the median distance of the rows from the centre."""
    dist = np.linalg.norm(np.asarray(rows, np.float64) - np.asarray(center, np.float64)[None, :], axis=1)
    return float(scale * np.median(dist))


def iterate(rows: np.ndarray, center: np.ndarray, tau: float, iters: int = 1) -> tuple[np.ndarray, np.ndarray, float]:
    """The paper's ``L = iters`` steps of CC from ``v_0 = center``; returns ``(v_L, b, a)`` with ``v_L = a v_0 +
    Σ_i b_i x_i`` (each row's coefficient ``b_i`` and the centre's ``a``: the rule is affine in the rows once the
    clip factors are known, ``v_{l+1} = (1 − S_l/n) v_l + Σ_i (s_i^l / n) x_i``)."""
    if iters < 1:
        raise ValueError(f"centered clipping needs at least one iteration, got {iters}")
    x = np.asarray(rows, np.float64)
    n = x.shape[0]
    if n < 1:
        raise ValueError("centered clipping needs at least one row")
    v = np.asarray(center, np.float64).copy()
    b = np.zeros(n)
    a = 1.0
    for _ in range(iters):
        s = clip_factors(x, v, tau)
        keep = 1.0 - float(s.sum()) / n
        v = keep * v + (s[:, None] * x).sum(axis=0) / n
        b = keep * b + s / n
        a = keep * a
    return v, b, a


def shares(rows: np.ndarray, center: np.ndarray, tau: float, iters: int = 1) -> np.ndarray:
    """Each row's coefficient ``b_i`` in the aggregate (:func:`iterate`)."""
    return iterate(rows, center, tau, iters)[1]
