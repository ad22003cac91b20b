"""Synchronous FedAvg: FedBuff with K = the number of enrolled sites and no staleness.

McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017: ``x ← x + Σ n_i Δ_i / Σ n_i`` (with the
default server_lr = 1). For comparison runs and for plants that want rounds:
every update in a round weighs by its sample count alone (s is taken as 0),
though ``max_staleness`` still drops updates from long-gone rounds.
"""
from __future__ import annotations

from aggregator.strategies.fedbuff import FedBuff


class FedAvg(FedBuff):
    name = "fedavg"

    @property
    def buffer_size(self) -> int:
        return self.n_sites

    def factor(self, s: int) -> float:
        return 1.0
