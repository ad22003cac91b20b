"""Aggregation strategies, one module per paper; :func:`make_strategy` picks the configured one."""

from __future__ import annotations

from aggregator.config import StrategyConfig
from aggregator.strategies.base import Accepted, ReduceResult, Strategy
from aggregator.strategies.fedasync import FedAsync
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.fedbuff import FedBuff

STRATEGIES: dict[str, type[Strategy]] = {"fedasync": FedAsync, "fedbuff": FedBuff, "fedavg": FedAvg}


def make_strategy(cfg: StrategyConfig, n_sites: int, norm_bound: float | None = None) -> Strategy:
    return STRATEGIES[cfg.kind](cfg, n_sites, norm_bound)


__all__ = ["STRATEGIES", "Accepted", "FedAsync", "FedAvg", "FedBuff", "ReduceResult", "Strategy", "make_strategy"]
