"""The strategy base class: one reduce step with options; subclasses override only ``reduce``.

Why Flower-style small subclasses: the bookkeeping every asynchronous strategy
shares (staleness weights, the buffer, norm clipping, the robust combine)
lives here once, and each paper's update rule is a few lines in its own
module that can be read next to the paper.

Everything is pure numpy on ``dict[str, np.ndarray]`` holding the *shared*
parameters only: personal ones (a site's local head) never arrive, so they are
never touched.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from aggregator import robust, staleness
from aggregator.config import StrategyConfig

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
    weight: float  # what the reduce weighs it by (strategy-specific)
    delta: State = field(repr=False)
    norm: float | None = None  # L2 norm, when validation already computed it


    def lineage(self) -> dict[str, object]:
        return {"site": self.site, "counter": self.counter, "msg_id": self.msg_id,
                "base_version": self.base_version, "n_samples": self.n_samples,
                "staleness": self.staleness, "factor": self.factor, "weight": self.weight}


@dataclass
class ReduceResult:
    model: State
    momentum: State | None
    clip_scales: list[float]


class Strategy:
    """Shared machinery; subclasses set ``name`` and override :meth:`reduce`."""

    name = "base"

    def __init__(self, cfg: StrategyConfig, n_sites: int = 1) -> None:
        self.cfg = cfg
        self.n_sites = max(1, n_sites)
        self.f = staleness.make(cfg.staleness, cfg.a, cfg.b)

    # -- what subclasses may tune ------------------------------------------------
    @property
    def buffer_size(self) -> int:
        """Updates gathered before one reduce (1: apply each update at once)."""
        return self.cfg.buffer_size

    def factor(self, s: int) -> float:
        """f(s), never above 1."""
        return min(1.0, self.f(s))

    def weight(self, n_samples: int, s: int) -> float:
        """The update's weight in a buffered mean: samples · f(s)."""
        return float(n_samples) * self.factor(s)

    # -- the shared options of every reduce --------------------------------------
    def clipped(self, updates: Sequence[Accepted]) -> tuple[list[State], list[float]]:
        """Deltas after the per-update norm bound (``[strategy] norm_bound``; 0 = off)."""
        out, scales = [], []
        for u in updates:
            d, scale = robust.clip(u.delta, self.cfg.norm_bound, u.norm)
            out.append(d)
            scales.append(scale)
        return out, scales

    def combine(self, deltas: Sequence[State], weights: Sequence[float]) -> State:
        """Weighted mean, or the configured robust statistic (coordinate-wise median, trimmed mean)."""
        if self.cfg.robust == "median":
            return robust.median(deltas)
        if self.cfg.robust == "trimmed_mean":
            return robust.trimmed_mean(deltas, self.cfg.trim)
        return robust.weighted_mean(deltas, weights)

    # -- the step ---------------------------------------------------------------------
    def reduce(self, model: State, updates: Sequence[Accepted], momentum: State | None) -> ReduceResult:
        """New model (new arrays; ``model`` is not modified) from ``updates``."""
        raise NotImplementedError
