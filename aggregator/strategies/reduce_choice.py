"""Which statistic a strategy's reduce takes: the configured one, or with ``robust = "auto"`` (the default)
the coordinate-wise median wherever it can run, and the plain mean where it cannot.

Why the median by default: one site at its fair share (1/K, clipped to an honest norm) that attacks in
every version still steers a plain mean along a direction no honest update pulls back, e.g. a
model-replacement backdoor (RELIABILITY.md, the attack suite: 0.67-0.82 backdoor success against 0.20
clean with the mean); the coordinate-wise median of the K slots (Yin et al., "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates", ICML 2018) ignores a minority of arbitrary
updates, and is meaningful because a site holds at most one slot of a buffer (issue 14). Its accuracy
cost on the demo's federation was nil on average (RELIABILITY.md).

``robust = "fltrust"`` (Cao et al., NDSS 2021; :func:`aggregate.fltrust_combination`) weighs each update by
its cosine with an update the aggregator trains itself on its ``[evaluation]`` rows (the root dataset,
:mod:`aggregator.root_update`); it needs that table, and like the median it needs each update in the clear.

Where ``auto`` keeps the mean, and why:

- ``secure_aggregation = true``: the aggregator sees only each cohort's masked sum; there is no
  coordinate to take a median of.
- ``kind = "fedasync"``: one update per reduce.
- K < 3: the median of two values is their mean, of one the value itself; it protects nothing.
- ``sample_weighting = true``: the operator asked for McMahan's sample-weighted mean; Yin et al.'s
  median has no weights (set ``robust = "median"`` to take it over the weighted deltas anyway).
"""

from __future__ import annotations

from typing import Literal

from aggregator.config import StrategyConfig

Reduce = Literal["mean", "median", "trimmed_mean", "fltrust"]

MIN_MEDIAN_K = 3  # below three slots a median is a mean (or one site's delta)


def resolve(cfg: StrategyConfig, k: int) -> Reduce:
    """The reduce in force for ``cfg`` with a buffer (round) of ``k`` slots: ``"mean"``, ``"median"`` or
    ``"trimmed_mean"``. Explicit settings are kept; ``"auto"`` is the median where it can run."""
    if cfg.robust == "none":
        return "mean"
    if cfg.robust != "auto":
        return cfg.robust
    if cfg.kind == "fedasync" or cfg.secure_aggregation or cfg.sample_weighting or k < MIN_MEDIAN_K:
        return "mean"
    return "median"
