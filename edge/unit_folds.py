"""Evidence a small site need not hold out: its candidates compared on folds of its own training units.

Why: a site's validation slice is a fifth of its rows (or of its units), so a
small plant's slice cannot decide which model its line should serve: a plant
with 19 engines holds out 0-1 engine, one with 21 failures holds out 4. Serving
the fine-tuned model blind there cost a plant 5.8 % RMSE on average
(docs/tuning.md, seventh pass). Its training rows hold more evidence, if every
row is scored by a model that did not train on it: K-fold cross-validation
(scikit-learn's ``GroupKFold`` convention), with whole units (engines,
machines, batches) in one fold, so a model is never scored on a trajectory it
memorised.

For each fold the site trains the local-only candidate on the other folds and
fine-tunes the global model on the other folds, both noise-free and as the
full candidates train (:mod:`edge.personal`), and scores the fold's rows with
them and with the global model. The pooled out-of-fold predictions, with the
validation rows scored by the full candidates, are the evidence
:func:`edge.personal.pick` decides on when the slice alone is too small.

Why ε is unchanged: the folds are the site's own rows, trained on without
noise at the site; the fold models are never sent, never served and never
trained on by a DP round (as the local-only and fine-tuned candidates). The
global model did see these rows, in the site's DP rounds: its out-of-fold
score is the one candidate that is not fully held out; DP bounds how much any
row moved it, and docs/tuning.md measures the rule on splits it was not chosen on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np


def fold_of_rows(
    n: int, k: int, split: str, groups: Sequence[object] | None = None, y: np.ndarray | None = None
) -> np.ndarray:
    """Each of ``n`` training rows' fold, ``0..K-1`` with ``K <= k`` (fewer when there are fewer units).

    - ``group``: whole units per fold, the units dealt round-robin in the order of a hash of their key
      (stable across runs and restarts, not by arrival);
    - ``time``: ``K`` consecutive blocks in arrival order (each fold is a stretch of the stream);
    - ``random`` (independent rows): dealt round-robin in arrival order, each class separately when ``y``
      holds classes (every fold gets its share of the rarer class).
    """
    if n == 0:
        return np.zeros(0, dtype=int)
    if split == "group":
        if groups is None or len(groups) != n:
            raise ValueError("folds of a group split need one unit per training row")
        keys = sorted({str(g) for g in groups}, key=lambda u: hashlib.blake2b(u.encode(), digest_size=8).digest())
        kk = max(1, min(k, len(keys)))
        fold = {u: i % kk for i, u in enumerate(keys)}
        return np.array([fold[str(g)] for g in groups], dtype=int)
    kk = max(1, min(k, n))
    if split == "time":
        return (np.arange(n) * kk) // n
    out = np.zeros(n, dtype=int)
    labels = np.zeros(n) if y is None else np.asarray(y).reshape(n, -1)[:, 0]
    classes = np.unique(labels) if y is not None and set(np.unique(labels)) <= {0.0, 1.0} else [None]
    for c in classes:
        idx = np.arange(n) if c is None else np.flatnonzero(labels == c)
        out[idx] = np.arange(len(idx)) % kk
    return out


def out_of_fold(
    folds: np.ndarray,
    train: Callable[[np.ndarray, str], dict[str, np.ndarray]],
    predict: Callable[[dict[str, np.ndarray], np.ndarray], np.ndarray],
    global_params: dict[str, np.ndarray],
    fold_local: dict[int, dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Each candidate's prediction of every training row by a model that did not train on it.

    ``train(rows, kind)`` trains ``kind`` (``local`` or ``fine_tuned``) on the training rows ``rows`` (indices);
    ``predict(params, rows)`` scores rows; ``fold_local`` caches the local-only fold models (they depend on the
    rows only, not on the global version) and is filled in here. The global model scores every row as it is.
    """
    n = len(folds)
    every = np.arange(n)
    out = {"local": np.zeros(n), "fine_tuned": np.zeros(n), "global": predict(global_params, every)}
    for f in np.unique(folds):
        held, rest = every[folds == f], every[folds != f]
        if int(f) not in fold_local:
            fold_local[int(f)] = train(rest, "local")
        out["local"][held] = predict(fold_local[int(f)], held)
        out["fine_tuned"][held] = predict(train(rest, "fine_tuned"), held)
    return out
