"""The edge agent's training task: when to train, one DP-SGD round, and the sealed update it queues.

Schedule: a round on every ``every_rows`` new rows or ``every_s`` seconds (whichever first, and only if there
are new rows), or on a new global version (``on_new_model``). A round is skipped, with its reason counted, while
the site recovers its state, the outbox is full (``stop_training``), no secure-aggregation cohort is ready, an
update on this base still waits for its receipt, there are too few rows, or the privacy budget is spent.

Why training runs in a worker thread: a round takes seconds; the loop must keep receiving receipts, publishing
and answering the broker's keep-alives meanwhile. Why the counter is taken after training (under one lock): the
outbox's counters must stay in the order the updates are queued, whatever else happened during the round.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from broker_bridge import quantised
from broker_bridge.envelope import UpdateHeader, seal_update
from edge.model_store import GlobalModel
from edge.outbox import OutboxFull
from edge.site_state import SiteState, wait_event
from edge.trainer import Plan, RoundResult, plan_round, train_round
from fedline.logs import event

log = logging.getLogger("fedline.edge")


@dataclass
class _Rows:
    """The rows of one round and how they are sampled (``selection``: the ledger's pick, under DP)."""

    x: np.ndarray
    y: np.ndarray | None
    plan: Plan
    selection: Any = None


@dataclass
class _Sealed:
    """One update ready for the outbox."""

    counter: int
    msg_id: str
    blob: bytes
    meta: dict[str, str]
    epsilon: float | None
    encoding: str


def privacy_fields(ledger: Any, selection: Any, plan: Plan) -> dict[str, Any]:
    """The update header's public privacy parameters: what the aggregator checks and records (no plant data)."""
    dp = ledger.cfg
    return {
        "mode": "dp-sgd",
        "accountant": dp.accountant,
        "accounting": "per_record",
        "clip_norm": dp.max_grad_norm,
        "noise_multiplier": dp.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "steps": plan.steps,
        "epsilon": selection.epsilon_after,
        "delta": dp.delta,
        "unit_group": ledger.group,
    }


def _r(v: float | None) -> float | None:
    """A figure for the logs: rounded, and None for NaN."""
    return None if v is None or v != v else round(float(v), 6)


def _reads(base: GlobalModel, fmt: str) -> bool:
    """Whether the aggregator that made ``base`` reads ``fmt`` (FLT2 tensors, FLU2 binary headers): its signed
    manifest says so; an older one does not, and gets FLT1 and JSON headers."""
    reads = base.manifest.get("reads")
    return isinstance(reads, list) and fmt in reads


class Rounds:
    """Trains on schedule; ``export`` rebuilds the line's ONNX after a round that changed the personal layers."""

    def __init__(self, state: SiteState, export: Callable[[], Awaitable[Path | None]]) -> None:
        self.state = state
        self._export = export
        self._lock = asyncio.Lock()  # one round at a time: the counter is taken after training

    async def loop(self) -> None:
        """Wait for a reason to train (or the timer), then train once; a failed round waits for the next reason."""
        st = self.state
        every_s = st.cfg.training.every_s
        while True:
            await wait_event(st.wake_train, max(0.0, every_s - (time.monotonic() - st.last_round_at)))
            st.wake_train.clear()
            rebased, st.rebased = st.rebased, False
            if st.cfg.training.every_rows and st.new_rows == 0 and not rebased:  # the row-count schedule
                st.last_round_at = time.monotonic()
                continue
            try:
                await self.train_once()
            except Exception as exc:  # a failed round must not end the agent: report, wait for the next trigger
                st.last_round_at = time.monotonic()
                st.metrics.rounds_skipped.labels("failed").inc()
                event(log, "round.failed", logging.ERROR, site=st.site, error=repr(exc))
                log.debug("round.failed traceback", exc_info=True)
                st.error(f"round failed: {exc}")

    async def train_once(self) -> str | None:
        """One round now: train, seal, queue. Returns the msg_id queued, or None when skipped."""
        async with self._lock:
            return await self._round()

    def _skip(self, reason: str, **fields: Any) -> None:
        self.state.metrics.rounds_skipped.labels(reason).inc()
        event(log, "round.skipped", logging.INFO, site=self.state.site, reason=reason, **fields)
        self.state.last_round_at = time.monotonic()

    async def _round(self) -> str | None:
        st = self.state
        if st.recovery is not None:  # counter and ε unknown until the aggregator answers (edge.recovery)
            self._skip("recovering")
            return None
        triggered = time.perf_counter()
        st.first_round_pending = False
        if not self._may_train():
            return None
        # the new rows this round answers; rows stored while it selects (a worker thread, under DP) are not in
        # its selection, so they stay new and wake the next round (every_rows) rather than wait for every_s
        consumed = st.new_rows
        rows = await self._rows()
        if rows is None:
            return None
        st.new_rows -= consumed
        base = st.base
        holdout = st.dataset.arrays(holdout=True)
        cfg = st.cfg
        result = await asyncio.to_thread(
            train_round,
            st.spec,
            base.shared,
            st.personal,
            rows.x,
            rows.y,
            cfg.training,
            st.dp,
            holdout,
            cfg.model_seed,
            rows.plan,
        )
        sealed = self._seal(base, rows, result)
        if not await self._queue(sealed, base, len(rows.x), consumed):
            return None
        await self._finish(sealed, base, rows, result, time.perf_counter() - triggered)
        return sealed.msg_id

    def _may_train(self) -> bool:
        """The gates before any row is read: room in the outbox, a cohort, no unanswered update, enough rows."""
        st, cfg = self.state, self.state.cfg
        if cfg.outbox.policy == "stop_training" and st.outbox.is_full():
            depth, nbytes = st.outbox.depth()
            st.set_publishing("outbox_full", outbox_depth=depth, outbox_bytes=nbytes)
            self._skip("outbox_full")
            return False
        if st.cohorts is not None and st.cohorts.ready(st.base.version) is None:
            self._skip("no_cohort")  # secure aggregation: one update per cohort joined, on its base
            return False
        pending = st.outbox.unsettled_on_base(st.base.version)
        if pending >= cfg.training.max_pending_per_base:  # no budget on an update that cannot help yet
            self._skip("pending_receipt", base_version=st.base.version, pending=pending)
            return False
        n_train, _ = st.dataset.counts()
        if n_train < cfg.training.min_rows:
            self._skip("too_few_rows", rows=n_train, min_rows=cfg.training.min_rows)
            return False
        return True

    async def _rows(self) -> _Rows | None:
        """This round's rows: the newest ones, or under DP the ledger's pick (None: the budget is spent)."""
        st = self.state
        if st.ledger is None:
            x, y = st.dataset.arrays(newest=st.cfg.training.max_train_rows)
            return _Rows(x, y, plan_round(len(x), st.cfg.training))
        return await self._private_rows(st.ledger)

    async def _private_rows(self, ledger: Any) -> _Rows | None:
        """Rows within their privacy budget (per-record accounting), sampled as the ledger planned."""
        st, t = self.state, self.state.cfg.training
        if ledger.cfg.max_releases and ledger.releases >= ledger.cfg.max_releases:
            st.set_publishing("budget_exhausted", releases=ledger.releases)
            self._skip("release_cap", releases=ledger.releases)
            return None
        selection = await asyncio.to_thread(self._select)
        if selection is None or selection.rows < t.min_rows:
            st.set_publishing("budget_exhausted", epsilon=round(ledger.epsilon, 4), budget=ledger.cfg.epsilon)
            self._skip("budget_exhausted", eligible=0 if selection is None else selection.rows)
            return None
        x, y = st.dataset.training_between(selection.lo, selection.hi)
        plan = Plan(len(x), min(t.batch_size, len(x)), selection.sample_rate, selection.steps, t.epochs)
        st.metrics.rows_eligible.set(len(x))
        return _Rows(x, y, plan, selection)

    def _select(self) -> Any:
        """The rows of the next round under per-record accounting (rows past their budget retire)."""
        st = self.state
        assert st.ledger is not None
        t = st.cfg.training

        def plan(n: int) -> tuple[float, int]:
            p = plan_round(t.plan_rows or n, t)
            return p.sample_rate, p.steps

        return st.ledger.select(
            st.dataset, time.time(), plan, max_age_s=st.cfg.dataset.max_age_s, newest=t.max_train_rows
        )

    def _seal(self, base: GlobalModel, rows: _Rows, result: RoundResult) -> _Sealed:
        """The delta sealed to the aggregator (or masked for the cohort), under the next counter."""
        st = self.state
        counter = st.outbox.last_counter() + 1
        msg_id = secrets.token_hex(8)  # random: the topic names no counter (it travels in the sealed header)
        privacy: dict[str, Any] = {"mode": "off"}
        meta: dict[str, str] = {}
        eps_after = None
        if st.ledger is not None and rows.selection is not None:
            eps_after = rows.selection.epsilon_after
            privacy = privacy_fields(st.ledger, rows.selection, rows.plan)
            meta["record_ledger"] = st.ledger.state_after(rows.selection)
        encoding = st.cfg.update.encoding  # int8: rounded after the DP noise (post-processing), broker_bridge.quantised
        header = UpdateHeader(st.site, counter, msg_id, base.version, len(rows.x), privacy, encoding=encoding)
        if st.cohorts is not None:
            blob = st.cohorts.seal(header, result.delta)
        else:
            tensors = quantised.encode(result.delta, encoding)
            blob = seal_update(
                header,
                tensors,
                st.keys,
                st.enrollment.aggregator.box_pub,
                _reads(base, "FLT2"),
                _reads(base, "FLU2"),
                _reads(base, "FLS2"),
            )
        return _Sealed(counter, msg_id, blob, meta, eps_after, encoding)

    async def _queue(self, sealed: _Sealed, base: GlobalModel, n_samples: int, consumed: int) -> bool:
        """Queue the update and commit its privacy cost together; False (the rows count again) if it was not."""
        st = self.state
        try:
            dropped = await asyncio.to_thread(
                st.outbox.put,
                site=st.site,
                counter=sealed.counter,
                msg_id=sealed.msg_id,
                base_version=base.version,
                n_samples=n_samples,
                epsilon=sealed.epsilon,
                blob=sealed.blob,
                meta=sealed.meta,
            )
        except OutboxFull as exc:  # filled up while training (stop_training): nothing released, nothing accounted
            st.new_rows += consumed
            st.set_publishing("outbox_full", detail=str(exc))
            self._skip("outbox_full")
            return False
        except sqlite3.Error as exc:  # e.g. disk full: rolled back, so nothing released and nothing accounted
            st.new_rows += consumed
            event(log, "update.not_queued", logging.ERROR, site=st.site, counter=sealed.counter, error=str(exc))
            st.error(f"update not queued: {exc}")
            self._skip("outbox_write_failed")
            return False
        if st.ledger is not None:
            st.ledger.commit(sealed.meta["record_ledger"])
        for d in dropped:
            st.metrics.dropped.inc()
            event(
                log,
                "outbox.dropped",
                logging.WARNING,
                site=st.site,
                counter=d.counter,
                msg_id=d.msg_id,
                reason="outbox full",
                policy=st.cfg.outbox.policy,
                detail="its privacy cost was paid and it will never be delivered (policy drop_oldest)",
            )
        return True

    async def _finish(self, sealed: _Sealed, base: GlobalModel, rows: _Rows, result: RoundResult, took: float) -> None:
        """Keep the new personal layers, record and log the round, wake the sender, refresh the line's model."""
        st = self.state
        st.personal = result.personal
        if st.personal_names:
            try:
                await asyncio.to_thread(st.store.save_personal, st.personal)
            except OSError as exc:  # kept in memory; saved with the next round
                event(log, "personal.save_failed", logging.ERROR, site=st.site, error=str(exc))
        self._record(sealed, base, rows, result, took)
        if st.publishing != "ok":
            st.set_publishing("ok")
        st.changed()
        st.wake_send.set()
        if st.personal_names:
            await self._export()

    def _record(self, sealed: _Sealed, base: GlobalModel, rows: _Rows, result: RoundResult, took: float) -> None:
        """The round's figures: ``last_round``, the metrics and the ``update.sealed`` event."""
        st = self.state
        st.last_round = {
            "counter": sealed.counter,
            "msg_id": sealed.msg_id,
            "base_version": base.version,
            "n_samples": len(rows.x),
            "steps": rows.plan.steps,
            "train_loss": _r(result.train_loss),
            "holdout_loss": _r(result.holdout_loss),
            "holdout_accuracy": _r(result.holdout_accuracy),
            "train_s": round(result.seconds, 3),
            "trigger_to_outbox_s": round(took, 3),
        }
        st.metrics.rounds.inc()
        st.metrics.sealed.inc()
        st.metrics.round_seconds.set(result.seconds)
        st.last_round_at = time.monotonic()
        event(
            log,
            "update.sealed",
            site=st.site,
            counter=sealed.counter,
            msg_id=sealed.msg_id,
            bytes=len(sealed.blob),
            encoding=sealed.encoding,
            epsilon=_r(sealed.epsilon),
            **{k: v for k, v in st.last_round.items() if k not in ("counter", "msg_id")},
        )
