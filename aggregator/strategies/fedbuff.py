"""FedBuff: gather K updates, apply their weighted mean with a server learning rate.

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation",
AISTATS 2022 (arXiv:2106.06639), Algorithm 1: the server adds each client's
delta to a buffer; after K of them it steps ``x ← x + η_g · Δ̄``. Here ``Δ̄`` is
the mean weighted by ``n_samples · f(s)`` (the paper's uniform mean with its
staleness scaling, extended by sample counts as in FedAvg), or a robust
statistic when ``[strategy] robust`` says so; optional server momentum
``m ← β m + Δ̄; x ← x + η_g m`` (Hsu et al. 2019, FedAvgM).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aggregator import robust
from aggregator.strategies.base import Accepted, ReduceResult, State, Strategy


class FedBuff(Strategy):
    name = "fedbuff"

    def reduce(self, model: State, updates: Sequence[Accepted], momentum: State | None) -> ReduceResult:
        deltas, scales = self.clipped(updates)
        step = self.combine(deltas, [u.weight for u in updates])
        beta = self.cfg.server_momentum
        if beta > 0:
            momentum = {k: (beta * momentum[k] + step[k]).astype(np.float32) if momentum else step[k].copy()
                        for k in step}
            step = momentum
        new = {k: np.array(v, dtype=np.float32, copy=True) for k, v in model.items()}
        for k in new:
            robust.add_scaled(new[k], step[k], self.cfg.server_lr)
        return ReduceResult(new, momentum, scales)
