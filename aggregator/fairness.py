"""Start-up checks that keep one site from steering the global model, and keep versions from leaking one delta.

Why at start-up: these rules depend on the enrollment (how many sites there
are) as well as the config, so they cannot be checked by the config parser
alone. An aggregator that could never publish (fewer enrolled sites than
``min_sites``) refuses to start with the reason; FedAsync, whose every version
is one site's update, starts only with ``min_sites = 1`` and says so loudly
on every start.
"""

from __future__ import annotations

import logging

from aggregator.config import StrategyConfig
from aggregator.strategies.base import Strategy
from broker_bridge.errors import FedlineError
from fedline.logs import event

log = logging.getLogger("fedline.aggregator")

LEAK_WARNING = (
    "FedAsync with min_sites = 1: every version is ONE site's update, so every member (and anyone "
    "holding the federation key) reads that site's DP-noised delta as w[v+1] - w[v]"
)


class FairnessError(FedlineError):
    """The federation cannot satisfy the configured fairness rules."""


def check_federation(cfg: StrategyConfig, strategy: Strategy, n_sites: int, enrollment_file: str) -> None:
    """Refuse settings under which no version could ever be published; warn about the FedAsync leak."""
    if n_sites < cfg.min_sites:
        raise FairnessError(
            f"{enrollment_file}: {n_sites} enrolled site(s), but [strategy] min_sites is "
            f"{cfg.min_sites}: no version could ever be published; enroll more sites or lower "
            f"min_sites"
        )
    if cfg.kind == "fedasync":
        event(log, "aggregator.fedasync_leak", level=logging.ERROR, message=LEAK_WARNING)
    if strategy.reduce_stat == "mda" and strategy.left_out == 0:
        event(
            log,
            "aggregator.mda_leaves_nothing_out",
            level=logging.WARNING,
            enrolled=n_sites,
            min_sites=cfg.min_sites,
            why=f"robust = 'mda' would sum fewer than min_sites = {cfg.min_sites} distinct sites per version; it "
            f"sums all {strategy.buffer_size} (the mean): enroll at least min_sites + mda_f sites for MDA to leave "
            "one out",
        )
    elif strategy.buffer_size < cfg.buffer_size:
        event(
            log,
            "aggregator.buffer_clamped",
            level=logging.WARNING,
            buffer_size=cfg.buffer_size,
            enrolled=n_sites,
            using=strategy.buffer_size,
            waits_for=strategy.arrivals,  # under MDA K + f: it leaves f out (aggregator.mda.sizes)
            why="one update per site per buffer: K (plus the slots MDA leaves out) cannot exceed the enrolled sites",
        )
