"""The aggregator as the reducer of intake workers: it reads their forwards instead of the sites' updates.

Why the reducer is the ordinary aggregator process: everything that must stay
in one place does (the verdict store with its duplicate and replay rules, one
update per site per buffer, norm bounds and min_sites at the reduce, receipts,
versions, publishing, key epochs). Only stage 1 (open, verify, validate) moves
to the workers (:mod:`aggregator.intake_worker`); what they send is opened here
by :meth:`Forwards.open` and decided by :meth:`aggregator.core.AggregatorCore.decide`
exactly as a site's update opened in this process would be.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from aggregator.config import AggregatorConfig
from aggregator.forward import is_forward, open_forward
from aggregator.opener import Opened, read_update
from broker_bridge.envelope import UpdateHeader
from broker_bridge.errors import FedlineError, WireError
from broker_bridge.keys import Enrollment, KeyPair, PublicKeys
from broker_bridge.mosquitto import intake_users
from fedline.logs import event

log = logging.getLogger("fedline.aggregator")


def worker_public_keys(cfg: AggregatorConfig) -> dict[str, PublicKeys]:
    """``intake-<i>`` -> its public keys, from ``<keys_dir>/intake-<i>.pub.json`` (a missing or wrong file: an error)."""
    out: dict[str, PublicKeys] = {}
    for w in intake_users(cfg.intake.workers):
        path = Path(cfg.intake.keys_dir) / f"{w}.pub.json"
        pub = PublicKeys.load(path)
        if pub.role != "worker" or pub.ident != w:
            raise FedlineError(f"{path}: expected the public key of intake worker {w!r}, got {pub.role} {pub.ident!r}")
        out[w] = pub
    return out


class Forwards:
    """Opens the workers' forwards (thread-safe: immutable keys) and reads buffered ones back after a restart."""

    def __init__(self, cfg: AggregatorConfig) -> None:
        self.cfg = cfg
        self.keys = KeyPair.load(cfg.aggregator.key_file)
        self.workers = worker_public_keys(cfg)

    def open(self, blob: bytes, worker: str) -> Opened:
        """A forward as an :class:`Opened`; a forged or broken one is refused without a site (counted, no receipt)."""
        try:
            return open_forward(blob, self.keys, self.workers, from_worker=worker)
        except WireError as exc:
            event(log, "forward.refused", level=logging.WARNING, worker=worker, reason=exc.reason, error=exc.detail)
            return Opened(blob, reason=f"forward_{exc.reason}", detail=exc.detail)

    def reopen(self, blob: bytes) -> tuple[UpdateHeader, Mapping[str, np.ndarray]]:
        """A buffered row's bytes back as (header, delta): a forward, or a site's update buffered before workers."""
        if not is_forward(blob):
            enrollment = Enrollment.load(self.cfg.aggregator.enrollment_file)
            return read_update(blob, self.keys, enrollment)
        op = open_forward(blob, self.keys, self.workers)
        if op.header is None or op.tensors is None:
            raise WireError("schema", "a buffered forward without the site's header and delta")
        return op.header, op.tensors
