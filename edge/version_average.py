"""The mean of the federation's last few global versions the site adopted: a steadier model to start from.

Why: each DP global version carries the Gaussian noise of the rounds that made
it, and consecutive versions differ mostly by that noise (the federation's
steps are small next to it by the last versions). Averaging the iterates of a
noisy SGD run (Polyak-Ruppert / tail averaging) cuts that noise; De et al.
(2022, "Unlocking high-accuracy differentially private image classification
through scale") average the parameters of DP-SGD's last iterates for the same
reason. A small plant's served model is three quarters its own model and one
quarter the global model fine-tuned on its rows (docs/tuning.md, ninth and
tenth passes), so the fine-tune's starting point is where the DP noise
reaches its line.

This is post-processing of models the aggregator already published: the
average is computed at the plant from versions it received, stays on its disk
(inside the line's ONNX), is never sent and never starts a DP round (the next
round starts from the published global model), so ε is unchanged
(docs/architecture.md, "The served model").

numpy only: the edge's pick (:mod:`edge.personal`) imports it.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


class VersionAverage:
    """The uniform mean of the last ``last`` versions added (fewer while fewer have been added).

    A version is added once (adding the version already held again is a no-op,
    as a line export may run twice on one version); an older version than the
    newest held is ignored (the edge adopts forward only). Versions whose arrays
    do not match the held ones' names and shapes (a new model) start the window
    afresh.
    """

    def __init__(self, last: int) -> None:
        if last < 1:
            raise ValueError(f"a version average needs last >= 1, got {last}")
        self.last = last
        self._held: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    @property
    def versions(self) -> list[int]:
        """The versions the mean is over, oldest first."""
        return list(self._held)

    def add(self, version: int, params: dict[str, np.ndarray]) -> None:
        """Hold ``params`` (every array of the model) as ``version``'s."""
        if self._held:
            newest = next(reversed(self._held))
            if version <= newest:
                return
            ref = self._held[newest]
            if set(ref) != set(params) or any(np.shape(ref[k]) != np.shape(params[k]) for k in ref):
                self._held.clear()
        self._held[version] = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
        while len(self._held) > self.last:
            self._held.popitem(last=False)

    def mean(self) -> dict[str, np.ndarray]:
        """Each array's mean over the held versions (float32, as the models hold them)."""
        if not self._held:
            raise ValueError("no version has been added to average")
        held = list(self._held.values())
        return {k: np.mean([h[k] for h in held], axis=0).astype(np.float32) for k in held[0]}
