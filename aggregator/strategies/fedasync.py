"""FedAsync: apply every update the moment it arrives, mixed in by staleness.

Xie, Koyejo, Gupta, "Asynchronous Federated Optimization", 2019
(arXiv:1903.03934). The paper mixes models, ``x ← (1 − α_t) x + α_t x_new``
with ``α_t = α · f(t − τ)``; with deltas trained from base ``x_τ`` (what sites
send here) this is ``x ← x + α · f(s) · Δ``, the form DESIGN.md fixes. The
sample count does not enter: one update is applied at a time.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aggregator import robust
from aggregator.strategies.base import Accepted, ReduceResult, State, Strategy


class FedAsync(Strategy):
    name = "fedasync"

    @property
    def buffer_size(self) -> int:
        return 1

    def weight(self, n_samples: int, s: int) -> float:
        return self.cfg.alpha * self.factor(s)

    def reduce(self, model: State, updates: Sequence[Accepted], momentum: State | None) -> ReduceResult:
        deltas, scales = self.clipped(updates)
        new = {k: np.array(v, dtype=np.float32, copy=True) for k, v in model.items()}
        for u, d in zip(updates, deltas):
            for k in new:
                robust.add_scaled(new[k], d[k], u.weight)
        return ReduceResult(new, momentum, scales)
