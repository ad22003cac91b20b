"""The strategy base class: the bookkeeping every strategy shares; subclasses override only ``reduce``.

Why Flower-style small subclasses: what every strategy shares (staleness
factors, the buffer size, norm clipping, the robust combine) lives here once;
each paper's rule is a pure function in :mod:`aggregator.strategies.aggregate`,
and each strategy's ``reduce`` (one file per paper) says which it applies.

Everything is numpy on ``dict[str, np.ndarray]`` holding the *shared*
parameters only: personal ones (a site's local head) never arrive, so they are
never touched.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from aggregator import mda, robust, staleness
from aggregator.config import StrategyConfig
from aggregator.strategies import aggregate, reduce_choice

State = dict[str, np.ndarray]


@dataclass
class Accepted:
    """An update that passed every check, waiting to be (or being) reduced."""

    site: str
    counter: int
    msg_id: str
    base_version: int
    n_samples: int
    staleness: int
    factor: float  # f(s)
    weight: float  # its coefficient in the step (FedBuff f(s)/K, FedAsync α f(s)); set again at the reduce
    delta: Mapping[str, np.ndarray] = field(repr=False)  # float32, or an int8 update's Int8Delta
    norm: float | None = None  # L2 norm, when validation already computed it
    base: State | None = field(default=None, repr=False)  # x_τ, for FedAsync's mix
    rate: float = 1.0  # FedAsync's per-site rate scale of α (aggregator.site_rate)
    trust: float | None = None  # FLTrust's trust score ReLU(cos(Δ, g_0)), when robust = "fltrust"

    def lineage(self) -> dict[str, object]:
        return {
            "site": self.site,
            "counter": self.counter,
            "msg_id": self.msg_id,
            "base_version": self.base_version,
            "n_samples": self.n_samples,
            "staleness": self.staleness,
            "factor": self.factor,
            "weight": self.weight,
            "rate": self.rate,
            **({"norm": round(self.norm, 9)} if self.norm is not None else {}),  # as received, before clip_scale
            **({"trust": round(self.trust, 6)} if self.trust is not None else {}),
        }


@dataclass
class ReduceResult:
    model: State
    momentum: State | None
    clip_scales: list[float]


class Strategy:
    """Shared machinery; subclasses set ``name`` and override :meth:`reduce`."""

    name = "base"
    needs_base = False  # the reduce needs each update's base model x_τ

    def __init__(self, cfg: StrategyConfig, n_sites: int | None = None, norm_bound: float | None = None) -> None:
        self.cfg = cfg
        self.n_sites = cfg.buffer_size if n_sites is None else max(1, n_sites)  # None: as many as K
        self.f = staleness.make(cfg.staleness, cfg.a, cfg.b)
        # the L2 bound in force (aggregator.normbound): the configured one, or derived from [dp] by the core
        self.norm_bound = (cfg.norm_bound or 0.0) if norm_bound is None else norm_bound
        # the statistic in force: robust = "auto" is MDA where it can run (reduce_choice), decided on the slots a
        # buffer can hold before MDA's own wait (the configured K, at most the enrolled sites)
        self.reduce_stat: reduce_choice.Reduce = reduce_choice.resolve(
            cfg, min(self.capacity, self.n_sites), self.n_sites
        )
        self._size()
        # FLTrust's server update g_0 from the current model on the root rows (aggregator.root_update); the
        # core sets it when [evaluation] is configured
        self.reference: Callable[[State], State] | None = None

    def resize(self, n_sites: int) -> None:
        """Sized for ``n_sites`` enrolled sites: the enrollment changed while the aggregator runs
        (:meth:`aggregator.core.AggregatorCore.take_enrollment`). K, the arrivals a buffer waits for and the reduce
        in force follow from it exactly as at start, so a revoked site is no longer waited for."""
        self.n_sites = max(1, n_sites)
        self.reduce_stat = reduce_choice.resolve(self.cfg, min(self.capacity, self.n_sites), self.n_sites)
        self._size()

    def _size(self) -> None:
        """K and the slots MDA leaves out, for the current ``n_sites`` and reduce: worked out here, where those two
        change (at start and in :meth:`resize`, their only writers), not on every read. Why: the core reads
        ``arrivals`` and ``buffer_size`` three to four times per update, and each read went through the chain
        ``arrivals`` -> ``buffer_size`` -> ``left_out`` -> ``capacity`` (0.4-0.6 us a read on the shared VM)."""
        left_out = 0
        if self.reduce_stat == "mda":
            arrivals, kept = mda.sizes(self.cfg.mda_f, self.capacity, self.n_sites, self.cfg.min_sites)
            left_out = arrivals - kept
        self._left_out = left_out
        self._buffer_size = min(self.capacity, self.n_sites - left_out)

    # -- what subclasses may tune ------------------------------------------------
    @property
    def capacity(self) -> int:
        """The configured K (FedBuff's ``buffer_size``; FedAvg: every enrolled site; FedAsync: 1)."""
        return self.cfg.buffer_size

    @property
    def left_out(self) -> int:
        """f: the slots MDA leaves out of a full buffer (0 under any other reduce; :meth:`_size`)."""
        return self._left_out

    @property
    def buffer_size(self) -> int:
        """K: the slots (one per site) a version sums, FedBuff's K (``f(s)/K`` each); at most the enrolled sites
        less the slots MDA leaves out (:func:`aggregator.mda.sizes`; :meth:`_size`)."""
        return self._buffer_size

    @property
    def arrivals(self) -> int:
        """Updates (one per site) a buffer waits for: K, and under MDA K + f (it keeps K of them)."""
        return self._buffer_size + self._left_out

    def factor(self, s: int) -> float:
        """f(s), never above 1."""
        return min(1.0, self.f(s))

    def weight(self, n_samples: int, s: int) -> float:
        """The coefficient the update would get in a full buffer (receipts of buffered updates say it)."""
        return self.factor(s) / self.buffer_size

    def coefficients(self, updates: Sequence[Accepted]) -> list[float]:
        """Each update's coefficient in ``Σ c_i Δ_i``: ``f(s_i)/K``, or ``p_i f(s_i)`` with sample weighting."""
        factors = [u.factor for u in updates]
        if self.cfg.sample_weighting:
            return aggregate.sample_coefficients([u.n_samples for u in updates], factors, self.cfg.sample_cap)
        return aggregate.uniform_coefficients(factors, self.buffer_size)

    # -- the shared options of every reduce --------------------------------------
    def clipped(self, updates: Sequence[Accepted]) -> tuple[list[Mapping[str, np.ndarray]], list[float]]:
        """Deltas after the norm bound, and with ``clip_to_median`` after the buffer's median norm; with
        ``norm_to_median`` under the median or trimmed mean every delta is rescaled (up as well as down) to that
        bound (:func:`robust.rescale`)."""
        norms = [robust.l2_norm(u.delta) if u.norm is None else u.norm for u in updates]
        for u, n in zip(updates, norms):
            u.norm = n  # the lineage records it beside the clip scale
        bound = self.norm_bound
        if self.cfg.clip_to_median and len(updates) > 1:
            median = statistics.median(norms)
            bound = median if bound <= 0 else min(bound, median)
        # equalised only under a coordinate-wise statistic, which selects values (a mean weighs them: a short
        # honest delta, e.g. a small site's, keeps its smaller say there, and FLTrust rescales on its own), and
        # only to the buffer's median norm, never up to the [dp] worst-case bound alone (far above an honest delta)
        equalise = (
            self.cfg.norm_to_median
            and self.cfg.clip_to_median
            and self.reduce_stat in ("median", "trimmed_mean", "mda")
            and len(updates) > 1
            and bound > 0
        )
        out, scales = [], []
        for u, n in zip(updates, norms):
            d, scale = robust.rescale(u.delta, bound, n) if equalise else robust.clip(u.delta, bound, n)
            out.append(d)
            scales.append(scale)
        return out, scales

    def combine(
        self,
        deltas: Sequence[Mapping[str, np.ndarray]],
        updates: Sequence[Accepted],
        model: State,
        center: State | None = None,
    ) -> State:
        """``Σ c_i Δ_i`` with the strategy's coefficients (:meth:`coefficients`), or the robust statistic in force
        of the ``c_i Δ_i`` times their count (:func:`aggregate.robust_combination`: a robust reduce moves the model
        as far as the mean when all agree), or FLTrust's trust-weighted step (:func:`aggregate.fltrust_combination`,
        against ``g_0`` trained from ``model``), or MDA's: the kept slots weighed as the strategy weighs any slots
        it sums (FedBuff ``f(s)/K``; FedAvg the mean of the kept; sample weighting normalised over the kept), the
        left-out ones 0 (:func:`aggregate.mda_combination`), or centered clipping's around ``center`` (the previous
        version's step, :func:`aggregate.cclip_combination`). Sets each update's ``weight`` (and ``trust``) to what
        it got in the step."""
        if self.reduce_stat == "mda":
            return self.mda_step(deltas, updates)
        coefficients = self.coefficients(updates)
        for u, c in zip(updates, coefficients):
            u.weight = c
        if self.reduce_stat == "cclip":
            step, weights = aggregate.cclip_combination(
                deltas, coefficients, center, self.cfg.cclip_tau, self.cfg.cclip_iters
            )
            for u, w in zip(updates, weights):
                u.weight = w  # the part of its own delta in the step (a clipped slot's rest went to the centre)
            return step
        if self.reduce_stat == "mean":
            return aggregate.linear_combination(deltas, coefficients)
        if self.reduce_stat == "fltrust":
            if self.reference is None:
                raise RuntimeError('robust = "fltrust" needs the server update on the root rows ([evaluation])')
            step, weights, trust = aggregate.fltrust_combination(deltas, coefficients, self.reference(model))
            for u, w, t in zip(updates, weights, trust):
                u.weight, u.trust = w, t
            return step
        return aggregate.robust_combination(deltas, coefficients, self.reduce_stat, self.cfg.trim)

    def mda_step(self, deltas: Sequence[Mapping[str, np.ndarray]], updates: Sequence[Accepted]) -> State:
        """MDA's step (:meth:`combine`): the kept slots at their coefficients, the left-out ones 0; with
        ``input_column_veto`` (1.2 by default; 0 = off) a kept slot is also dropped from the input columns of the
        first layer's weights whose own MDA subset leaves it out (:func:`aggregate.mda_decisions`): its ``weight`` stays
        its largest coefficient on any parameter, ``f(s)/K``."""
        # a buffer closed early (buffer_timeout_s) holds fewer: never keep fewer than min_sites of them
        f = mda.kept_at_least(self.cfg.mda_f, len(deltas), self.cfg.min_sites)
        keep, vetoes = aggregate.mda_decisions(deltas, f, self.cfg.input_column_veto)
        kept = self.coefficients([updates[i] for i in keep])
        coefficients = [kept[keep.index(i)] if i in keep else 0.0 for i in range(len(updates))]
        for u, c in zip(updates, coefficients):
            u.weight = c  # its share of the step, or none (left out)
        step = aggregate.linear_combination([deltas[i] for i in keep], kept)
        name = aggregate.input_tensor(deltas[0])
        if not vetoes or name is None:
            return step
        return aggregate.vetoed_step(step, deltas, keep, kept, name, vetoes)

    # -- the step ---------------------------------------------------------------------
    def step(
        self,
        model: State,
        deltas: Sequence[Mapping[str, np.ndarray]],
        updates: Sequence[Accepted],
        momentum: State | None,
    ) -> tuple[State, State | None]:
        """The combined step applied: ``x ← x + η_g Δ̄`` with server momentum (:func:`aggregate.server_step`); under
        centered clipping the state carried to the next version (stored where momentum is) is this step, the next
        version's centre."""
        if self.reduce_stat == "cclip":
            step = self.combine(deltas, updates, model, momentum)
            new, _ = aggregate.server_step(model, step, self.cfg.server_lr)
            return new, aggregate.copy_state(step)
        step = self.combine(deltas, updates, model)
        return aggregate.server_step(model, step, self.cfg.server_lr, momentum, self.cfg.server_momentum)

    def reduce(self, model: State, updates: Sequence[Accepted], momentum: State | None) -> ReduceResult:
        """New model (new arrays; ``model`` is not modified) from ``updates``; sets each ``weight``."""
        raise NotImplementedError
