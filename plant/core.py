"""The plant's aggregator core: FedBuff over its lines, whose reduces go upstream and whose served model is central.

Why a subclass of :class:`aggregator.core.AggregatorCore` and not a new core:
intake, validation, staleness, the one-update-per-site buffer, durability and
the ledger are exactly those of any aggregator; only three things differ.

- **What is served.** Lines get the central model only (:meth:`served`): a
  reduce commits a plant version (its lineage names the line updates, so the
  plant's ledger reconciles like any aggregator's) but the publisher keeps
  serving the last central model adopted.
- **Where a reduce goes.** Each reduce's combined delta (the plant version
  minus the one before it: exactly what the plant's strategy did to its
  model) is sealed as an update of the plant's site in the central
  federation and queued in the plant's outbox (:mod:`plant.uplink`), with
  ``upstream_version`` (the last plant version queued) in the same
  transaction. A crash between the plant's commit and that transaction is
  repaired at start: every reduce above ``upstream_version`` is queued then.
- **Adoption.** A verified central version becomes a plant version whose
  lineage says ``{"strategy": "upstream", "upstream_version": v}``; the
  buffer stays (its line updates, now one version stale, go into the next
  reduce).

Privacy: each line's ε is its own. The plant's step only averages deltas
that were already DP-noised on the lines (post-processing), so no record's
guarantee changes; the upstream header reports the largest ε among the lines
in the delta (the guarantee of any record in it) and ``accounting =
"per_line"``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from aggregator.core import AggregatorCore, Decision, State
from aggregator.opener import Opened
from broker_bridge import envelope
from fedline.logs import event

log = logging.getLogger("fedline.plant")

UPSTREAM = "upstream"  # the lineage "strategy" of a version adopted from the central federation


class PlantCore(AggregatorCore):
    """An aggregator core whose reduces are sent upstream and whose served model is the central one.

    ``queue_delta(plant_version, base_version, delta, n_samples, privacy)`` puts one delta in the
    plant's outbox (and returns False when it cannot now, e.g. the outbox is full: it is retried).
    """

    def __init__(self, *args: Any, queue_delta: Callable[..., bool], queued_through: Callable[[], int], **kw: Any):
        self._queue_delta = queue_delta
        self._queued_through = queued_through
        self._ready = False  # commits made while the base class loads are not reduces to queue
        self.upstream_of: dict[int, int] = {}  # plant version -> central version, for adopted versions
        super().__init__(*args, **kw)
        self.line_epsilon: dict[str, float | None] = json.loads(self.store.get_meta("line_epsilon") or "{}")
        served = None
        queued = self._queued_through()
        # lineage is kept for every version: from the newest down to the newest adoption at or below the last
        # reduce queued (what the reduces still to queue take as their base), not through all history
        for v in range(self.version, -1, -1):
            ck = self.store.checkpoint(v, blobs=False)
            if ck is not None and ck.lineage.get("strategy") == UPSTREAM:
                self.upstream_of[v] = int(ck.lineage["upstream_version"])
                served = served if served is not None else v
                if v <= queued:
                    break
        self.central_version = self.upstream_of[served] if served is not None else -1
        if served is not None and served != self.version:
            ck = self.store.checkpoint(served)
            if ck is not None and ck.weights is not None:
                self.snapshot = (served, {k: np.array(a) for k, a in envelope.decode_tensors(ck.weights).items()})
        self._ready = True
        self.queue_pending()

    # -- what lines get ----------------------------------------------------------------
    def served(self, version: int, model: State, lineage: dict[str, Any]) -> tuple[int, State]:
        if lineage.get("strategy") == UPSTREAM:
            return version, model
        return self.snapshot  # a reduce: lines keep the central model until the next one is adopted

    def adopt(self, central_version: int, shared: State) -> int:
        """Make a verified central version the plant's served model; returns the plant version."""
        lineage = {"strategy": UPSTREAM, "upstream_version": central_version, "parent": self.version, "updates": []}
        model = {k: np.array(shared[k], dtype=np.float32) for k in self.model}
        self.upstream_of[self.version + 1] = central_version  # before the commit: it is not a reduce
        try:
            self.commit(model, self.momentum, lineage, [], keep_buffer=True)
        except BaseException:
            del self.upstream_of[self.version + 1]
            raise
        self.central_version = central_version
        event(log, "plant.adopted", central_version=central_version, plant_version=self.version)
        return self.version

    # -- what goes upstream ------------------------------------------------------------
    def decide(self, op: Opened) -> Decision:
        if op.header is not None and op.reason is None:
            self.heard(op.header)
        return super().decide(op)

    def heard(self, header: Any) -> None:
        """Remember each line's reported ε (public: its status says it), masked submissions included."""
        eps = header.privacy.get("epsilon") if header.privacy.get("mode") == "dp-sgd" else None
        if self.line_epsilon.get(header.site, -1.0) != eps:
            self.line_epsilon[header.site] = eps if isinstance(eps, (int, float)) else None
            self.store.set_meta("line_epsilon", json.dumps(self.line_epsilon, sort_keys=True))

    def commit(self, *args: Any, **kw: Any) -> list[dict[str, Any]]:
        """Every new version; a reduce (whatever path made it: a full buffer, a timeout) is queued upstream."""
        receipts = super().commit(*args, **kw)
        if self._ready and self.version not in self.upstream_of:
            self.queue_pending()
        return receipts

    def queue_pending(self) -> int:
        """Queue every reduce not yet in the outbox, in order; returns how many were queued now."""
        queued = 0
        for v, *item in self._waiting():
            if not self._queue_delta(v, *item):
                break
            queued += 1
        return queued

    def pending_reduces(self) -> list[tuple[int, int, State, int, dict[str, Any]]]:
        """Every reduce not yet in the outbox, in order, as ``(plant version, base, delta, samples, privacy)``.

        For a plant in the central federation's secure-aggregation cohorts (:mod:`plant.cohorts`): they
        all go into the next cohort as one masked update.
        """
        return list(self._waiting())

    def _waiting(self) -> Iterator[tuple[int, int, State, int, dict[str, Any]]]:
        """The reduces above the last one queued, lazily (stops at one whose checkpoint is gone)."""
        for v in range(self._queued_through() + 1, self.version + 1):
            ck = self.store.checkpoint(v, blobs=False)
            if ck is None or ck.lineage.get("strategy") == UPSTREAM:
                continue
            item = self._delta(v, ck.lineage)
            if item is None:
                return
            yield (v, *item)

    def _delta(self, v: int, lineage: dict[str, Any]) -> tuple[int, State, int, dict[str, Any]] | None:
        """(central base version, delta, samples, privacy) of plant version ``v``; None if a checkpoint is gone."""
        new, old = self.store.checkpoint(v), self.store.checkpoint(v - 1)
        if new is None or old is None or new.weights is None or old.weights is None:
            event(
                log,
                "plant.delta_unavailable",
                level=logging.ERROR,
                plant_version=v,
                detail="a checkpoint was pruned before its delta was queued (raise keep_checkpoints)",
            )
            return None
        a, b = envelope.decode_tensors(new.weights), envelope.decode_tensors(old.weights)
        delta = {k: np.asarray(a[k], np.float32) - np.asarray(b[k], np.float32) for k in a}
        base = max((c for p, c in self.upstream_of.items() if p < v), default=0)
        sites = sorted({u["site"] for u in lineage.get("updates", [])})
        eps = [self.line_epsilon.get(s) for s in sites]
        privacy: dict[str, Any] = {"mode": "plant", "accounting": "per_line", "lines": len(sites)}
        privacy["epsilon"] = None if not eps or any(e is None for e in eps) else max(e for e in eps if e is not None)
        samples = sum(int(u.get("n_samples", 0)) for u in lineage.get("updates", []))
        return base, delta, samples, privacy
