"""Which statistic a strategy's reduce takes: the configured one, or with ``robust = "auto"`` (the default)
minimum-diameter averaging (MDA) wherever it can run, and the plain mean where it cannot.

Why MDA by default (since 1 Dec 2026; the coordinate-wise median before): one site at its fair share (1/K,
clipped to an honest norm) that attacks in every version steers a plain mean along a direction no honest
update pulls back, e.g. a model-replacement backdoor. The coordinate-wise median of the K slots (Yin et al.,
"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018) lets that one slot
still pick, in every coordinate, which honest value wins: with the attack suite's loop fixed it held the
backdoor no better than the mean (+0.27 against +0.29 points over the clean model, RELIABILITY.md). MDA
(:mod:`aggregator.mda`; El-Mhamdi, Guerraoui and Rouault, ICLR 2021) leaves the slot farthest from the others
out whole, and halved that excess on development seeds (+0.14) at no cost in the clean model's ROC AUC. Both
are meaningful only because a site holds at most one slot of a buffer (issue 14). ``robust = "median"``
keeps the median.

``robust = "fltrust"`` (Cao et al., NDSS 2021; :func:`aggregate.fltrust_combination`) weighs each update by
its cosine with an update the aggregator trains itself on its ``[evaluation]`` rows (the root dataset,
:mod:`aggregator.root_update`); it needs that table, and like the median it needs each update in the clear.

``robust = "cclip"`` (Karimireddy, He and Jaggi, ICML 2021; :mod:`aggregator.cclip`) clips each slot's distance
from the previous version's step to the version's median distance and averages: an option, measured against MDA
in RELIABILITY.md (not the default).

Where ``auto`` keeps the mean, and why:

- ``secure_aggregation = true``: the aggregator sees only each cohort's masked sum; there is no
  update to measure or leave out.
- ``kind = "fedasync"``: one update per reduce.
- K < 3, K = min(``buffer_size``, enrolled sites) as configured: of two slots neither is the outlier (MDA needs
  2f + 1 received); a median of two is their mean. (Where MDA runs it then waits for K + f and keeps K:
  :func:`aggregator.mda.sizes`.)
- Too few sites to leave one out: with ``n`` enrolled and ``n ≤ K``, MDA would sum ``n − f``; below
  ``min_sites`` that breaks the rule that no version combines fewer distinct sites (at three sites and
  ``min_sites = 3`` each of the two kept could read the other's delta from the step), so ``f`` is lowered
  (:func:`aggregator.mda.sizes`) and, with nothing left out, ``auto`` keeps the mean of all three.
- ``sample_weighting = true``: the operator asked for McMahan's sample-weighted mean (set ``robust = "mda"``
  or ``"median"`` to take it over the weighted deltas anyway).
"""

from __future__ import annotations

from typing import Literal

from aggregator import mda
from aggregator.config import StrategyConfig

Reduce = Literal["mean", "median", "trimmed_mean", "fltrust", "mda", "cclip"]

MIN_MEDIAN_K = 3  # below three slots a median is a mean (or one site's delta)


def resolve(cfg: StrategyConfig, k: int, n_sites: int | None = None) -> Reduce:
    """The reduce in force for ``cfg`` with a buffer (round) of ``k`` slots and ``n_sites`` enrolled (None: as
    many as ``k``). Explicit settings are kept; ``"auto"`` is MDA where it can run and leave a slot out without
    summing fewer than ``min_sites`` sites, else the mean."""
    if cfg.robust == "none":
        return "mean"
    if cfg.robust != "auto":
        return cfg.robust
    if cfg.kind == "fedasync" or cfg.secure_aggregation or cfg.sample_weighting or k < MIN_MEDIAN_K:
        return "mean"
    arrivals, kept = mda.sizes(cfg.mda_f, k, k if n_sites is None else n_sites, cfg.min_sites)
    return "mda" if arrivals > kept else "mean"
