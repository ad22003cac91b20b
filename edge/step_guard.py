"""How far a new global model may move from the one a site uses before the site refuses it.

Why a bound on the edge too: the aggregator bounds each site's delta and the
step of each version, but a site should not have to trust that those bounds
held. A correctly signed model can still be far off: the aggregator's key
copied by an intruder, a bug or a misconfiguration (``norm_bound = 0``), or a
poisoned aggregate. An honest version moves the model by a small fraction of
its own size (server learning rate × a buffer of clipped DP deltas), so a
version that moved further than ``max_step_relative`` × the current model's L2
norm (or than ``max_step_l2``) per version is refused: the site keeps serving
and training on its current model, and says so (log ``model.refused`` with
``reason`` starting ``step``, ``fedline_edge_models_refused_step``, status
``model_refused``). The bound scales with the number of versions between the
two (a site that was away for five versions may see five steps at once), so a
later version that is within reach is adopted again.

Distances are over the shared (federated) parameters, which is all a version changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def l2(tensors: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in tensors.values()))


def step_refusal(
    current: Mapping[str, np.ndarray],
    new: Mapping[str, np.ndarray],
    versions: int,
    max_step_l2: float,
    max_step_relative: float,
) -> str | None:
    """Why ``new`` (``versions`` versions after ``current``) is too far to adopt, or None when it is not.

    A bound of 0 is off.
    """
    names = sorted(set(current) & set(new))
    step = l2({n: new[n].astype(np.float64) - current[n].astype(np.float64) for n in names})
    gap = max(1, versions)
    if max_step_l2 > 0 and step > max_step_l2 * gap:
        return f"step {step:.4g} exceeds max_step_l2 {max_step_l2:g} x {gap} version(s)"
    size = l2({n: current[n] for n in names})
    if max_step_relative > 0 and step > max_step_relative * gap * size:
        return (
            f"step {step:.4g} exceeds max_step_relative {max_step_relative:g} x {gap} version(s) "
            f"x the current model's norm {size:.4g}"
        )
    return None
