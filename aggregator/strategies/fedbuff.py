"""FedBuff: gather K updates, one per site, and step by their staleness-scaled mean.

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation",
AISTATS 2022 (arXiv:2106.06639), Algorithm 1: each client's delta enters the
buffer scaled by its staleness factor; after K of them the server steps
``x ← x + η_g · (1/K) · Σ f(s_i) Δ_i``. The division is by K, not by Σ f(s_i):
a stale update moves the model less than a fresh one (the first version of
this module normalised by Σ n·f(s), which cancelled staleness out). Options:
sample weighting ``Σ p_i f(s_i) Δ_i`` with ``p_i`` normalised over capped
sample counts; a robust statistic (MDA, the default: a buffer then waits
for K + f updates and sums the K it keeps; median, trimmed mean); server momentum
``m ← β m + Δ̄; x ← x + η_g m`` (Hsu et al. 2019, FedAvgM).
"""

from __future__ import annotations

from collections.abc import Sequence

from aggregator.strategies.base import Accepted, ReduceResult, State, Strategy


class FedBuff(Strategy):
    name = "fedbuff"

    def reduce(self, model: State, updates: Sequence[Accepted], momentum: State | None) -> ReduceResult:
        deltas, scales = self.clipped(updates)
        new, momentum = self.step(model, deltas, updates, momentum)
        return ReduceResult(new, momentum, scales)
