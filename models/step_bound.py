"""How far a new global model may move from the one in use before a site or a line refuses it.

Why a bound on the receiving side too: the aggregator bounds each site's delta
and the step of each version, but a site should not have to trust that those
bounds held. A correctly signed model can still be far off: the aggregator's
key copied by an intruder, a bug or a misconfiguration (``norm_bound = 0``), or
a poisoned aggregate. An honest version moves the model by a small fraction of
its own size (server learning rate × a buffer of clipped DP deltas; the demo's
first version, from the initial weights, moved 1.27 × their norm), so a version
that moved further than ``max_step_relative`` (default 10) × the current
model's L2 norm (or than ``max_step_l2``) per version is refused: the receiver
keeps its current model and says so. The bound scales with the number of
versions between the two (a receiver that was away for five versions may see
five steps at once), so a later version that is within reach is adopted again.

Two receivers use it, hence its home here (numpy only, importable by the line
inference, which never imports torch):

- the edge agent (``edge.agent``, ``[adopt]`` in site.toml) over the shared
  parameters of the signed weights it adopts (all a version changes);
- a line that follows the manifest (``edge.inference``, ``[line.adopt]`` in
  line.toml) over the parameters inside the ONNX it would serve
  (``edge.inference.onnx_params``): it measures what it runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepBound:
    """How far a new global model may move from the current one per version (0: off).

    ``max_step_relative`` is a share of the current model's L2 norm, ``max_step_l2`` an absolute L2
    distance; both multiplied by the number of versions between the two.
    """

    # 10: catches a destroyed model (the pre-fix attack moved 2,198x); an honest first version of the demo
    # moved 1.27x its initial norm, so 1.0 refused it (measured; set it tighter from your own lineage)
    max_step_relative: float = 10.0
    max_step_l2: float = 0.0

    def validate(self) -> None:
        if self.max_step_relative < 0 or self.max_step_l2 < 0:
            raise ValueError("max_step_relative and max_step_l2 must be >= 0 (0: off)")

    @property
    def enabled(self) -> bool:
        return self.max_step_relative > 0 or self.max_step_l2 > 0

    def refusal(self, current: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray], versions: int) -> str | None:
        """Why ``new`` is too far from ``current`` under this bound, or None (see :func:`step_refusal`)."""
        return step_refusal(current, new, versions, self.max_step_l2, self.max_step_relative)


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
