"""FedAsync: each update becomes a version the moment it arrives, mixed in by staleness.

Xie, Koyejo, Gupta, "Asynchronous Federated Optimization", 2019
(arXiv:1903.03934), Algorithm 1: ``x_t = (1 − α_t) x_{t−1} + α_t x_new`` with
``α_t = α · f(t − τ)`` and ``x_new`` the model the site trained from
``x_τ``, here ``x_τ + Δ``: the aggregator keeps the recent versions (its
checkpoints) to rebuild it. The mix pulls the model towards the stale base
``x_τ`` as the paper does; ``fedasync_form = "delta"`` is the shortcut
``x ← x + α_t Δ`` without that pull (an option, not the paper's rule). The
sample count does not enter. Each α_t is also scaled by the site's rate
(``aggregator.site_rate``: a site that sends faster than ``site_interval_s``
gets a proportionally smaller α, so one site cannot dominate by sending fast). One update per version means one site's delta
per version: any member reads it as ``w[v+1] − w[v]``, so FedAsync needs
``min_sites = 1``, set by the operator who accepts that.
"""

from __future__ import annotations

from collections.abc import Sequence

from aggregator.strategies import aggregate
from aggregator.strategies.base import Accepted, ReduceResult, State, Strategy


class FedAsync(Strategy):
    name = "fedasync"

    @property
    def capacity(self) -> int:
        return 1

    @property
    def needs_base(self) -> bool:  # type: ignore[override]
        return self.cfg.fedasync_form == "mix"

    def weight(self, n_samples: int, s: int) -> float:
        return self.cfg.alpha * self.factor(s)

    def reduce(self, model: State, updates: Sequence[Accepted], momentum: State | None) -> ReduceResult:
        deltas, scales = self.clipped(updates)
        new = model
        for u, d in zip(updates, deltas):
            u.weight = alpha_t = self.cfg.alpha * u.factor * u.rate  # rate: a site sending fast gains nothing
            if self.cfg.fedasync_form == "mix":
                if u.base is None:
                    raise ValueError(f"FedAsync's mix needs the base model of version {u.base_version}")
                new = aggregate.fedasync_mix(new, u.base, d, alpha_t)
            else:
                new = aggregate.fedasync_delta(new, d, alpha_t)
        return ReduceResult(aggregate.copy_state(new) if new is model else new, momentum, scales)
