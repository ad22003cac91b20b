"""How sure a site's validation rows are that a federation candidate beats its local-only model.

Why: the site's line should leave its own (local-only) model only when the
validation rows show the other candidate better by more than their own noise.
Both candidates score the *same* rows, so the comparison is paired: the noise
that matters is that of the difference, which is much smaller than each
score's own when the two models err on the same rows. Two standard paired
tests, one per metric, each giving the gain (positive = the challenger is
better) and its standard error:

- **ROC AUC**: DeLong, DeLong & Clarke-Pearson (Biometrics 1988). Each
  positive's and each negative's share of correctly ordered pairs (its
  "placement") is a per-row component of the AUC; the variance of the AUC
  difference is the variance of the components' differences over the
  positives plus that over the negatives:
  ``var = var_i(V10_a - V10_b) / m + var_j(V01_a - V01_b) / n``.
- **RMSE**: the mean squared error difference ``D = mean_k (e_b,k^2 - e_a,k^2)``
  (a lower RMSE is a lower MSE) with a cluster standard error over the
  validation units (engines, machines, batches: ``[dataset] group_column``),
  since rows of one unit are not independent and a model good on one engine's
  trajectory is good on all its rows. With ``S_g`` the summed differences of
  unit ``g`` (``n_g`` rows, ``N`` rows, ``G`` units):
  ``var(D) = G / (G - 1) * sum_g (S_g - n_g D)^2 / N^2`` (the "CR1" sandwich);
  without units each row is its own unit and this is ``s^2 / N``.

The one-sided p-value reads the ratio gain / se against the normal
distribution (DeLong; rows) or Student's t with ``G - 1`` degrees of freedom
(units: a variance estimated from a handful of engines is itself noisy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Evidence:
    """A challenger against a baseline on the same validation rows (gain > 0: the challenger is better)."""

    gain: float  # ROC AUC points, or MSE in the model's (normalised) target units
    se: float  # standard error of the gain
    p: float  # one-sided: the chance of a gain this large if the two were equally good
    units: int  # independent units the test rests on (rows, or groups)
    test: str  # "delong" | "paired-mse"

    @property
    def z(self) -> float:
        """The gain in standard errors (inf when the two err identically but differ in score: not possible)."""
        if self.se > 0:
            return self.gain / self.se
        return 0.0 if self.gain == 0 else math.copysign(math.inf, self.gain)


def _placements(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's components: each positive's share of negatives ranked below it (ties half), and each
    negative's share of positives ranked above it."""
    from scipy.stats import rankdata  # imported here, as in models.metrics

    pos, neg = s[y], s[~y]
    m, n = len(pos), len(neg)
    r_all = rankdata(s)
    v10 = (r_all[y] - rankdata(pos)) / n  # negatives below each positive (midranks count ties half)
    v01 = 1.0 - (r_all[~y] - rankdata(neg)) / m  # positives above each negative
    return v10, v01


def auc_evidence(y_true: np.ndarray, challenger: np.ndarray, baseline: np.ndarray) -> Evidence:
    """DeLong's paired test of two scores' ROC AUC on the same rows (NaN gain without both classes)."""
    y = np.asarray(y_true).ravel() > 0.5
    a = np.asarray(challenger, dtype=np.float64).ravel()
    b = np.asarray(baseline, dtype=np.float64).ravel()
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        return Evidence(math.nan, math.nan, math.nan, min(m, n), "delong")
    a10, a01 = _placements(y, a)
    b10, b01 = _placements(y, b)
    gain = float(a10.mean() - b10.mean())  # the mean placement of the positives is the AUC
    var = float(np.var(a10 - b10, ddof=1) / m + np.var(a01 - b01, ddof=1) / n)
    se = math.sqrt(max(var, 0.0))
    return Evidence(gain, se, _p_normal(gain, se), min(m, n), "delong")


def mse_evidence(
    y_true: np.ndarray, challenger: np.ndarray, baseline: np.ndarray, units: Sequence[object] | None = None
) -> Evidence:
    """The paired MSE difference (baseline's minus challenger's) with a cluster standard error over ``units``."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    d = (y - np.asarray(baseline, dtype=np.float64).ravel()) ** 2 - (
        y - np.asarray(challenger, dtype=np.float64).ravel()
    ) ** 2
    big_n = len(d)
    if units is None:
        keys: list[object] = list(range(big_n))
    elif len(units) != big_n:
        raise ValueError(f"{len(units)} unit labels for {big_n} validation rows")
    else:
        keys = list(units)
    sums: dict[object, float] = {}
    counts: dict[object, int] = {}
    for k, v in zip(keys, d):
        sums[k] = sums.get(k, 0.0) + float(v)
        counts[k] = counts.get(k, 0) + 1
    g = len(sums)
    if g < 2:
        return Evidence(math.nan, math.nan, math.nan, g, "paired-mse")
    gain = float(d.mean())
    resid = np.array([sums[k] - counts[k] * gain for k in sums])
    var = g / (g - 1) * float(np.sum(resid**2)) / big_n**2
    se = math.sqrt(var)
    p = _p_normal(gain, se) if units is None else _p_t(gain, se, g - 1)
    return Evidence(gain, se, p, g, "paired-mse")


def _p_normal(gain: float, se: float) -> float:
    """One-sided p of ``gain / se`` under the standard normal."""
    if se == 0:
        return 0.0 if gain > 0 else 1.0
    return 0.5 * math.erfc(gain / se / math.sqrt(2))


def _p_t(gain: float, se: float, df: int) -> float:
    """One-sided p of ``gain / se`` under Student's t with ``df`` degrees of freedom."""
    if se == 0:
        return 0.0 if gain > 0 else 1.0
    from scipy.stats import t

    return float(t.sf(gain / se, df))
