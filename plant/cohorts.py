"""The plant as a member of the central federation's secure-aggregation cohorts.

Why: a plant's combined delta is the mean of its lines' DP-noised updates, which
tells a competitor at the central aggregator how that plant's process moved the
model. With ``[upstream] secure_aggregation = true`` (and the central aggregator's
``[strategy] secure_aggregation = true``) the plant masks its delta into a central
cohort exactly as a line does (:class:`edge.secagg_member.EdgeCohorts`: the same
protocol, answer log and sealed replies), so the central aggregator reads only
the cohort's sum over three or more plants.

What differs from a line: a line trains *for* a cohort, a plant cannot (its
reduces happen when its lines' updates arrive). So the plant's reduces wait in
its store, as they do during a link cut (``upstream_version`` is not advanced
past them), and when the plant holds a cohort on the central version it serves,
every reduce still waiting goes in as one masked update: their mean (each reduce
is a mean of line updates computed from a central model, so their mean is the
mean of all those line updates; a sum would count the plant's lines twice). Its
``n_samples`` is the reduces' total and its ε the largest of its lines'
(post-processing: no record's guarantee changes).

A crash between masking and the outbox leaves the cohort one dropout short (the
answer log says "masked", so the retained announcement is not joined again) and
the reduces still waiting: they go into the next cohort. A cohort that fails
after the plant submitted refuses the update (``secagg_cohort_failed``); its
reduces are then spent, as a line's round is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

State = dict[str, np.ndarray]
Reduce = tuple[int, int, State, int, dict[str, Any]]  # (plant version, central base, delta, samples, privacy)


def combine(reduces: Sequence[Reduce]) -> tuple[int, State, int, dict[str, Any]]:
    """The reduces waiting for a cohort as one update: (last plant version, mean delta, samples, privacy)."""
    if not reduces:
        raise ValueError("no reduce to combine")
    names = list(reduces[0][2])
    delta = {k: np.mean([np.asarray(r[2][k], np.float64) for r in reduces], axis=0).astype(np.float32) for k in names}
    samples = sum(r[3] for r in reduces)
    eps = [r[4].get("epsilon") for r in reduces]
    privacy: dict[str, Any] = {
        "mode": "plant",
        "accounting": "per_line",
        "lines": max(int(r[4].get("lines", 0)) for r in reduces),
        "epsilon": None if any(e is None for e in eps) else max(float(e) for e in eps if e is not None),
    }
    return max(r[0] for r in reduces), delta, samples, privacy
