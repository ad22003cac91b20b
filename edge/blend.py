"""A fourth candidate for the line: a blend of the plant's local-only model and a federation model.

Why: two decent models whose errors are partly independent usually beat both
(an ensemble's error is the average error less the models' disagreement). The
local-only model knows the plant's own rows without noise; the federation
model (the DP global, or its noise-free fine-tune) knows the other plants.
Where the two are close (a mid-size plant) or where the federation model is
better on average but the plant's evidence is too thin to trust it split by
split (the smallest plants), serving ``w * local + (1 - w) * federation``
hedges between them. The served score is the weighted mean of the two
models' scores as the line sees them: probabilities for classification,
values for regression (an anomaly model has no labels to weigh by).

The weight ``w`` (the local-only model's share) is chosen from a small grid
on the same evidence the pick already uses (the validation rows, or for a
small site its training folds pooled with them, :mod:`edge.unit_folds`), and
the blend then competes with the other candidates under the pick's rule
(:func:`edge.personal.pick`).

The line still hot-reloads one ONNX file: :func:`edge.blend_export.export_blend` writes a
single graph holding both models and the weight (:class:`edge.blend_export.BlendScorer`), so
``edge.inference`` needs nothing new (and imports no torch). This module is
numpy only (the pick imports it); the torch side is :mod:`edge.blend_export`.

Why ε is unchanged: both parts are models the site already holds (its
noise-free local-only model, the published global model or its noise-free
fine-tune); the blend is computed at the plant, stays in the line's ONNX on
the plant's disk, is never sent and never trained on by a DP round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from models.metrics import better, score

#: The blend's kind in the site's choice and the line's status.
KIND = "blend"


def mix(w: float, local: np.ndarray, fed: np.ndarray) -> np.ndarray:
    """``w * local + (1 - w) * fed``: the blend's scores from its parts' (float64, as the evidence is scored)."""
    return w * np.asarray(local, dtype=np.float64) + (1.0 - w) * np.asarray(fed, dtype=np.float64)


def best_weight(metric: str, y: np.ndarray, local: np.ndarray, fed: np.ndarray, grid: Sequence[float]) -> float:
    """The grid's weight whose blend scores best on rows ``y`` (the first of equals: the grid's order decides)."""
    if not grid:
        raise ValueError("a blend needs at least one weight in [personal] blend_weights")
    best, best_score = grid[0], score(metric, y, mix(grid[0], local, fed))
    for w in grid[1:]:
        s = score(metric, y, mix(w, local, fed))
        if better(metric, s, best_score):
            best, best_score = w, s
    return float(best)


def spread_matched(w: float, local: np.ndarray, fed: np.ndarray) -> float:
    """The local-only share that is ``w`` of the blend once each part's scores are put on one scale.

    ``w * local + (1 - w) * fed`` weighs scores, not models: a part whose scores spread three times as wide
    decides three times as much of the order. A classifier's log-odds have no common scale: the plant's
    noise-free model, trained to near-zero loss on few rows, spreads its log-odds 1-4 times as wide as the DP
    global model (clipped, noised) on the same rows (docs/tuning.md, fourteenth pass), so a nominal 0.75 was in
    effect a 0.85 share (up to 0.92) and the partner could not reorder the rows the plant's model was wrongly sure of.
    Each part divided by its standard deviation on the evidence rows (z-score normalisation before score
    fusion: Jain, Nandakumar and Ross, Pattern Recognition 38, 2005) and the two coefficients rescaled to sum
    to 1 (so where the parts agree the blend says what they say) gives

        share = (w / sd_local) / (w / sd_local + (1 - w) / sd_fed).

    The centring of the z-score is left out: a constant moves no row's rank. ``w`` itself when either spread
    is zero or not finite (nothing to match)."""
    sl = float(np.std(np.asarray(local, dtype=np.float64)))
    sf = float(np.std(np.asarray(fed, dtype=np.float64)))
    if not (math.isfinite(sl) and math.isfinite(sf) and sl > 0 and sf > 0):
        return float(w)
    a, b = w / sl, (1.0 - w) / sf
    return a / (a + b)


def check_grid(grid: Sequence[float]) -> None:
    """Weights strictly between 0 and 1: at 0 or 1 the blend is one of its parts, already a candidate."""
    for w in grid:
        if not 0.0 < float(w) < 1.0:
            raise ValueError(f"[personal] blend_weights must lie strictly between 0 and 1, got {w}")
