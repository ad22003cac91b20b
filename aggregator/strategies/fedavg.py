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

from aggregator.strategies.base import Accepted, ReduceResult, State, Strategy


class FedAvg(Strategy):
    name = "fedavg"

    @property
    def capacity(self) -> int:
        return self.n_sites  # the round is every enrolled site (under MDA: K = the sites less the f left out)

    def factor(self, s: int) -> float:
        return 1.0

    def coefficients(self, updates: Sequence[Accepted]) -> list[float]:
        if self.cfg.sample_weighting:
            return super().coefficients(updates)
        return [1.0 / len(updates)] * len(updates)  # a round closed at its deadline: the mean of those who came

    def reduce(self, model: State, updates: Sequence[Accepted], momentum: State | None) -> ReduceResult:
        deltas, scales = self.clipped(updates)
        new, momentum = self.step(model, deltas, updates, momentum)
        return ReduceResult(new, momentum, scales)
