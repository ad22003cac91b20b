"""Synchronous FedAvg in rounds: the cohort is every enrolled site, one update each.

McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017: ``x ← x + Σ p_i Δ_i`` over one round's
cohort. Here a round is a buffer of K = the enrolled sites, at most one update
per site; it closes when every site has sent or at its deadline
(``buffer_timeout_s``) if a quorum (``quorum``, at least ``min_sites``) has.
An update trained on an earlier round's model is late: it joins the current
round with its own receipt (reason ``late``), at full weight, since FedAvg
has no staleness factor. ``p_i`` is ``1/K`` by default (the aggregator, not
a site's claimed sample count, sets the weight; McMahan's ``n_i / Σ n`` is
``sample_weighting`` with the aggregator's ``sample_cap``).
"""

from __future__ import annotations

from collections.abc import Sequence

from aggregator.strategies import aggregate
from aggregator.strategies.base import Accepted, ReduceResult, State, Strategy


class FedAvg(Strategy):
    name = "fedavg"

    @property
    def buffer_size(self) -> int:
        return self.n_sites

    def factor(self, s: int) -> float:
        return 1.0

    def reduce(self, model: State, updates: Sequence[Accepted], momentum: State | None) -> ReduceResult:
        deltas, scales = self.clipped(updates)
        coefficients = self.coefficients(updates)
        if not self.cfg.sample_weighting:  # a round closed at its deadline: the mean of those who came
            coefficients = [1.0 / len(updates)] * len(updates)
        step = self.combine(deltas, updates, coefficients, model)
        new, momentum = aggregate.server_step(model, step, self.cfg.server_lr, momentum, self.cfg.server_momentum)
        return ReduceResult(new, momentum, scales)
