"""The two scores a site picks its served model by and the demo reports: ROC AUC and RMSE.

ROC AUC is computed as the Mann-Whitney U statistic (scipy's ``rankdata`` with
ties averaged), which is what scikit-learn's ``roc_auc_score`` returns, without
pulling scikit-learn into the product for one function.
"""

from __future__ import annotations

import math

import numpy as np


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half).

    NaN when the rows hold only one class (a site's held-out rows without a failure).
    """
    y = np.asarray(y_true).ravel() > 0.5
    s = np.asarray(score, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    from scipy.stats import rankdata  # imported here: the edge's config loads this module without needing scipy

    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def rmse(y_true: np.ndarray, pred: np.ndarray) -> float:
    """Root mean squared error, in the label's own unit."""
    d = np.asarray(y_true, dtype=np.float64).ravel() - np.asarray(pred, dtype=np.float64).ravel()
    return float(np.sqrt(np.mean(d * d)))


def score(metric: str, y_true: np.ndarray, pred: np.ndarray) -> float:
    """``roc_auc`` or ``rmse`` by name."""
    if metric == "roc_auc":
        return roc_auc(y_true, pred)
    if metric == "rmse":
        return rmse(y_true, pred)
    raise ValueError(f"unknown metric {metric!r}")


def better(metric: str, a: float, b: float) -> bool:
    """Whether score ``a`` is better than ``b`` (higher AUC, lower RMSE)."""
    return a > b if metric == "roc_auc" else a < b
