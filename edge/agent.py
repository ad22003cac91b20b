"""The edge agent: read plant data, train with DP-SGD, send sealed deltas, follow the global model.

One asyncio process with six tasks that share the on-disk state:

- **ingest**: samples from the configured sources → rows (``firmware_adapters.rows``)
  → the bounded local dataset; counts new rows and fires the training trigger;
- **train**: on every ``every_rows`` new rows or ``every_s`` seconds (whichever first,
  and only if there are new rows) one local round in a worker thread, then seal,
  and queue in the outbox together with the counter and the privacy accountant;
- **send**: while connected, publish queued updates in order, chunked, QoS 1;
- **receive**: signed receipts (rows leave the outbox only on these), the
  federation content key granted to this site, the sealed model manifest and
  weight chunks (decrypted, verified, then the next round rebases on them);
- **status**: a retained status message (``offline`` by last will) every
  ``status_interval_s`` and on every change, without anything computed from
  plant data (``edge.status_doc``); the plant's own figures on /metrics and in the logs.

Why training in a thread: a round takes seconds; the loop must keep receiving
receipts, publishing and answering the broker's keep-alives meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np

from broker_bridge import quantised
from broker_bridge.chunking import split
from broker_bridge.client import BrokerSettings, Message, MqttClient, will_message
from broker_bridge.envelope import UpdateHeader, open_receipt, seal_update
from broker_bridge.errors import ModelRefused, NotConnected, PublishRefused, TopicError, WireError
from broker_bridge.federation_key import Keyring
from broker_bridge.keys import Enrollment, KeyPair
from broker_bridge.topics import Topics
from edge.config import EdgeConfig, load_edge_config, row_mapping
from edge.dataset import Dataset, UnitTracker
from edge.follow import ModelFollower
from edge.ledger_privacy import RecordLedger, window_group
from edge.metrics import EdgeMetrics
from edge.model_store import GlobalModel, ModelStore, check_global_model
from edge.outbox import Outbox, OutboxFull
from edge.personal import Personaliser
from edge.privacy import PrivacyBudget
from edge.recovery import Recovery, needs_recovery
from edge.secagg_member import EdgeCohorts
from edge.status_doc import build_status
from edge.trainer import Plan, plan_round, train_round
from fedline.config import ConfigError
from fedline.logs import event
from fedline.supervise import run_until_stopped
from models import ModelSpec, build_model, export_onnx, load_personal_state, load_shared_state
from models.flat import personal_state, shared_state, split_names

log = logging.getLogger("fedline.edge")


async def _wait_event(ev: asyncio.Event, timeout: float) -> None:
    """Wait for ``ev`` at most ``timeout`` seconds. Not ``asyncio.wait_for``: on Python 3.11 it can swallow
    a cancellation that arrives as the event is set, and the loop around it then never stops."""
    try:
        async with asyncio.timeout(timeout):
            await ev.wait()
    except TimeoutError:
        pass


class EdgeAgent:
    """One site. Construct (validates everything, opens the stores), then ``await agent.run()``."""

    def __init__(self, cfg: EdgeConfig) -> None:
        self.cfg = cfg
        self.site = cfg.site
        self.spec: ModelSpec = cfg.model
        self.dp = cfg.dp
        self.keys = KeyPair.load(cfg.path(cfg.keys.private))
        if self.keys.ident != cfg.site or self.keys.role != "site":
            raise ConfigError(
                cfg.file, "keys.private", f"key file is for {self.keys.role} {self.keys.ident!r}, not site {cfg.site!r}"
            )
        self.enrollment = Enrollment.load(cfg.path(cfg.keys.enrollment))
        if self.enrollment.federation != cfg.federation:
            raise ConfigError(
                cfg.file,
                "keys.enrollment",
                f"enrollment is for federation {self.enrollment.federation!r}, not {cfg.federation!r}",
            )
        self.topics = Topics(cfg.federation, cfg.topic_prefix)
        self.settings = BrokerSettings.from_table(cfg.broker, cfg.file, "broker", client_id=cfg.site)
        self.mapping = row_mapping(cfg)
        self.sources = self._build_sources()

        data_dir = cfg.path(cfg.data_dir)
        self.metrics = EdgeMetrics(cfg.site)
        self.dataset = Dataset(
            data_dir / "dataset.sqlite",
            self.spec.input_shape,
            None if self.spec.task == "anomaly" else self.spec.n_outputs,
            cfg.dataset.max_rows,
            cfg.dataset.holdout_fraction,
            cfg.dataset.effective_split,
        )
        # the line's model picked among local-only / global / fine-tuned on the held-out rows (edge/personal.py)
        self.personaliser = (
            Personaliser(cfg.personal, self.spec, cfg.model_seed) if cfg.personal.serve == "pick" else None
        )
        self.outbox = Outbox(data_dir / "outbox.sqlite", cfg.outbox.max_bytes, cfg.outbox.max_count, cfg.outbox.policy)
        # an empty state (new or lost data dir): nothing is trained or sent before the aggregator's answer
        self.recovery = (
            Recovery(self.keys, self.enrollment, cfg.federation, gap=cfg.outbox.max_count)
            if cfg.recovery.ask_aggregator and needs_recovery(self.outbox)
            else None
        )
        self.ledger = self._open_ledger() if self.dp else None
        self.store = ModelStore(data_dir, cfg.path(cfg.model_dir))
        self.keyring = Keyring()  # federation content keys by epoch, from this site's grants
        self.cohorts = (
            EdgeCohorts(self.keys, self.enrollment, self.topics, data_dir, self.keyring)
            if cfg.secure_aggregation
            else None
        )

        template = build_model(self.spec, seed=cfg.model_seed)
        try:
            self.shared_names, self.personal_names = split_names(self.spec, template)
        except ValueError as exc:  # a personal prefix that names nothing, or everything
            raise ConfigError(cfg.file, "model.personal", str(exc)) from None
        self.shapes = {n: tuple(p.shape) for n, p in template.named_parameters()}
        self.base = GlobalModel(
            0, {}, b"", b"", shared_state(template, self.spec)
        )  # version 0, built like the aggregator's
        self._load_last_good_model()
        self.personal = self.store.load_personal() or personal_state(template, self.spec)
        if set(self.personal) != set(self.personal_names):
            event(
                log,
                "personal.reset",
                logging.WARNING,
                site=self.site,
                reason="stored personal names differ from the spec",
            )
            self.personal = personal_state(template, self.spec)

        self.follower = ModelFollower(  # the signed, sealed global model (edge.follow)
            self.keys,
            self.enrollment.aggregator.sign_pub,
            cfg.federation,
            self.spec,
            self.shared_names,
            self.shapes,
            # newer than ours, and not the version just refused as too far a step (when it is re-announced)
            lambda v: self._wants(v) and (self.model_refused or {}).get("version") != v,
            keyring=self.keyring,
        )
        self.model_refused: dict[str, Any] | None = None  # the last version refused as too far a step
        self.new_rows = 0
        self.last_round_at = time.monotonic()
        self.publishing = "recovering" if self.recovery else "ok"  # ok | budget_exhausted | outbox_full | recovering
        self.last_error: str | None = None
        self.last_round: dict[str, Any] = {}
        self.client: MqttClient | None = None
        self.metrics_port: int | None = None
        self.sources_done = False
        self._trigger = asyncio.Event()
        self._rebased = False  # a new global version arrived (training.on_new_model)
        self._first_round_pending = True  # no round yet since start (see _ingest: a backlog that is in)
        self._send_wake = asyncio.Event()
        self._status_dirty = asyncio.Event()
        self._export_lock = asyncio.Lock()
        self._round_lock = asyncio.Lock()  # one round at a time: the counter is taken after training
        self._refresh_gauges()

    # ------------------------------------------------------------------ set-up
    def _build_sources(self) -> list[Any]:
        from firmware_adapters import build_source

        return [build_source(t, file=self.cfg.file, where=f"sources[{i}]") for i, t in enumerate(self.cfg.sources)]

    def _privacy_group(self) -> int:
        m = self.mapping
        return window_group(m.window, m.stride) if m.aggregate_s is None else 1

    def _open_ledger(self) -> RecordLedger:
        """The per-record privacy ledger from the outbox (an old global accountant is carried over)."""
        assert self.dp is not None
        group = self._privacy_group()
        state, legacy = self.outbox.get_meta("record_ledger"), self.outbox.get_meta("accountant")
        try:
            if state is None and legacy:  # every row stored so far may have been in every past release
                old = PrivacyBudget(self.dp, legacy)
                return RecordLedger.from_global_history(self.dp, group, old.history, self.dataset.last_id())
            return RecordLedger(self.dp, group, state)
        except ValueError as exc:
            raise ConfigError(self.cfg.file, "privacy", str(exc)) from None

    def _load_last_good_model(self) -> None:
        blobs = self.store.load_global_blobs()
        if blobs is None:
            return
        try:
            self.base = self._check(*blobs)
            event(log, "model.restored", site=self.site, version=self.base.version)
        except ModelRefused as exc:
            event(
                log,
                "model.refused",
                logging.WARNING,
                site=self.site,
                source="disk",
                reason=exc.reason,
                detail=exc.detail,
            )

    def _check(self, manifest_blob: bytes, weights_blob: bytes) -> GlobalModel:
        return check_global_model(
            manifest_blob,
            weights_blob,
            self.enrollment.aggregator.sign_pub,
            self.cfg.federation,
            self.spec,
            self.shared_names,
            self.shapes,
        )

    # ------------------------------------------------------------------ status
    @property
    def epsilon(self) -> float:
        """The per-record guarantee: the largest ε of any row this site ever trained on."""
        return self.ledger.epsilon if self.ledger else 0.0

    def privacy_status(self) -> dict[str, Any]:
        """Public privacy parameters for the status message (no plant data: no row counts)."""
        if self.ledger is None:
            return {"privacy": "off"}
        g = self.ledger.group
        return {
            "privacy": "on",
            "accounting": "per_record",
            "epsilon": round(self.epsilon, 6),
            "epsilon_budget": self.dp.epsilon if self.dp else None,
            "delta": self.dp.delta if self.dp else None,
            "privacy_unit": "row" if g == 1 else f"raw sample (in {g} overlapping windows, group-accounted)",
        }

    def status(self, state: str = "online") -> dict[str, Any]:
        """The retained status document (also what ``fedline status`` shows): see ``edge.status_doc``.

        Which model the site serves (``personaliser.choice``) is left out: it is chosen on the site's
        held-out rows, so it is plant data; it is in the model directory's pointer and the logs.
        """
        depth, _ = self.outbox.depth()
        return build_status(
            state=state,
            version=self.base.version,
            privacy=self.privacy_status(),
            publishing=self.publishing,
            outbox_depth=depth,
            epoch=max(self.keyring, default=-1),
            model_refused=self.model_refused,
        )

    def _refresh_gauges(self) -> None:
        m = self.metrics
        depth, nbytes = self.outbox.depth()
        m.model_version.set(self.base.version)
        m.epsilon.set(self.epsilon)
        if self.ledger is not None:
            m.epsilon_global_history.set(self.ledger.global_epsilon)
            m.rows_retired.set(self.ledger.retired)
            m.delta.set(self.dp.delta if self.dp else 0)
        m.epsilon_budget.set(self.dp.epsilon if self.dp else 0)
        m.budget_exhausted.set(1 if self.publishing == "budget_exhausted" else 0)
        m.outbox_depth.set(depth)
        m.outbox_bytes.set(nbytes)
        m.rows.set(len(self.dataset))
        m.connected.set(1 if self.client is not None and self.client.connected.is_set() else 0)

    def _changed(self) -> None:
        self._refresh_gauges()
        self._status_dirty.set()

    def _error(self, text: str) -> None:
        self.last_error = text
        self._changed()

    # ------------------------------------------------------------------ ingest
    def _example(self, row: Any) -> tuple[np.ndarray, np.ndarray | None]:
        if self.spec.task == "anomaly":
            return row.x, None
        y = float(row.y)
        if self.spec.task == "classification" and self.spec.n_outputs > 1:
            target = np.zeros(self.spec.n_outputs, np.float32)
            if 0 <= int(y) < self.spec.n_outputs:
                target[int(y)] = 1.0
            return row.x, target
        return row.x, np.full(self.spec.n_outputs, y, np.float32)

    async def _ingest(self) -> None:
        from firmware_adapters.stream import row_stream

        batch: list[tuple[np.ndarray, np.ndarray | None]] = []
        groups: list[str | None] = []  # each row's unit ([dataset] group_column): a unit is held out whole
        late: list[bool] = []  # each row's historical mark (late data, e.g. Sparkplug is_historical)
        units = UnitTracker(self.cfg.dataset.group_column)

        def failed(src: Any, exc: BaseException) -> None:  # a source must not take the agent down
            event(
                log, "source.failed", logging.ERROR, site=self.site, source=getattr(src, "name", "?"), error=repr(exc)
            )
            self._error(f"source {getattr(src, 'name', '?')}: {exc}")

        def ended(src: Any) -> None:
            nonlocal batch, groups, late
            if batch:
                self._store(batch, groups, late)
                batch, groups, late = [], [], []
            if self.cfg.training.on_new_model and self._first_round_pending and self.new_rows:
                # a source's backlog is in (e.g. a historian replay): the first round starts now rather
                # than at the fallback timer; later rounds follow the federation's versions
                self._trigger.set()

        def seen(sample: Any) -> None:
            self.metrics.samples.inc()
            if units.observe(sample.values):
                stream.builder.restart_window(sample.historical)  # a window never spans two units

        stream = row_stream(
            self.sources, self.mapping, file=self.cfg.file, on_source_error=failed, on_source_end=ended, on_sample=seen
        )
        async for row in stream:
            if row.y is not None or self.spec.task == "anomaly":
                batch.append(self._example(row))
                groups.append(units.current)
                late.append(bool(row.historical))
            if batch and (len(batch) >= 64 or stream.pending == 0):
                self._store(batch, groups, late)
                batch, groups, late = [], [], []
        if batch:
            self._store(batch, groups, late)
        self.sources_done = True
        event(log, "sources.ended", site=self.site, stored=len(self.dataset), **stream.builder.stats.__dict__)

    def _store(
        self, batch: list[tuple[np.ndarray, np.ndarray | None]], groups: list[str | None], late: list[bool]
    ) -> None:
        try:
            self.dataset.add_many(batch, groups=groups, historical=late)
        except sqlite3.Error as exc:  # e.g. "database or disk is full": drop these rows, keep running
            self.metrics.rows_lost.inc(len(batch))
            event(log, "dataset.write_failed", logging.ERROR, site=self.site, rows=len(batch), error=str(exc))
            self._error(f"dataset write failed: {exc}")
            return
        self.new_rows += len(batch)
        self.metrics.examples.inc(len(batch))
        self.metrics.examples_historical.inc(sum(late))
        self.metrics.rows.set(len(self.dataset))
        every_rows = self.cfg.training.every_rows
        if every_rows and self.new_rows >= every_rows:
            self._trigger.set()

    # ------------------------------------------------------------------ training
    async def _train_loop(self) -> None:
        every_s = self.cfg.training.every_s
        while True:
            wait = max(0.0, every_s - (time.monotonic() - self.last_round_at))
            try:
                await _wait_event(self._trigger, wait)
            except TimeoutError:
                pass
            self._trigger.clear()
            rebased, self._rebased = self._rebased, False
            if self.cfg.training.every_rows and self.new_rows == 0 and not rebased:  # the row-count schedule
                self.last_round_at = time.monotonic()
                continue
            try:
                await self.train_once()
            except Exception as exc:  # a failed round must not end the agent: report, wait for the next trigger
                self.last_round_at = time.monotonic()
                self.metrics.rounds_skipped.labels("failed").inc()
                event(log, "round.failed", logging.ERROR, site=self.site, error=repr(exc))
                log.debug("round.failed traceback", exc_info=True)
                self._error(f"round failed: {exc}")

    def _skip(self, reason: str, **fields: Any) -> None:
        self.metrics.rounds_skipped.labels(reason).inc()
        event(log, "round.skipped", logging.INFO, site=self.site, reason=reason, **fields)
        self.last_round_at = time.monotonic()

    def _set_publishing(self, state: str, **fields: Any) -> None:
        if state != self.publishing:
            level = logging.INFO if state == "ok" else logging.WARNING
            event(log, f"publishing.{state}", level, site=self.site, **fields)
            self.publishing = state
        self._changed()

    async def train_once(self) -> str | None:
        """One round now: train, seal, queue. Returns the msg_id queued, or None when skipped."""
        async with self._round_lock:
            return await self._round()

    async def _round(self) -> str | None:
        if self.recovery is not None:  # counter and ε unknown until the aggregator answers (edge.recovery)
            self._skip("recovering")
            return None
        triggered = time.perf_counter()
        self._first_round_pending = False
        cfg = self.cfg
        if cfg.outbox.policy == "stop_training" and self.outbox.is_full():
            depth, nbytes = self.outbox.depth()
            self._set_publishing("outbox_full", outbox_depth=depth, outbox_bytes=nbytes)
            self._skip("outbox_full")
            return None
        if self.cohorts is not None and self.cohorts.ready(self.base.version) is None:
            self._skip("no_cohort")  # secure aggregation: one update per cohort joined, on its base
            return None
        pending = self.outbox.unsettled_on_base(self.base.version)
        if pending >= cfg.training.max_pending_per_base:  # no budget on an update that cannot help yet
            self._skip("pending_receipt", base_version=self.base.version, pending=pending)
            return None
        n_train, _ = self.dataset.counts()
        if n_train < cfg.training.min_rows:
            self._skip("too_few_rows", rows=n_train, min_rows=cfg.training.min_rows)
            return None
        selection = None
        if self.ledger is not None:
            if self.ledger.cfg.max_releases and self.ledger.releases >= self.ledger.cfg.max_releases:
                self._set_publishing("budget_exhausted", releases=self.ledger.releases)
                self._skip("release_cap", releases=self.ledger.releases)
                return None
            selection = await asyncio.to_thread(self._select)
            if selection is None or selection.rows < cfg.training.min_rows:
                self._set_publishing(
                    "budget_exhausted", epsilon=round(self.ledger.epsilon, 4), budget=self.ledger.cfg.epsilon
                )
                self._skip("budget_exhausted", eligible=0 if selection is None else selection.rows)
                return None
            x, y = self.dataset.training_between(selection.lo, selection.hi)
            plan = Plan(
                len(x),
                min(cfg.training.batch_size, len(x)),
                selection.sample_rate,
                selection.steps,
                cfg.training.epochs,
            )
            self.metrics.rows_eligible.set(len(x))
        else:
            x, y = self.dataset.arrays(newest=cfg.training.max_train_rows)
            plan = plan_round(len(x), cfg.training)
        consumed, self.new_rows = self.new_rows, 0
        base = self.base
        holdout = self.dataset.arrays(holdout=True)
        result = await asyncio.to_thread(
            train_round,
            self.spec,
            base.shared,
            self.personal,
            x,
            y,
            cfg.training,
            self.dp,
            holdout,
            cfg.model_seed,
            plan,
        )
        counter = self.outbox.last_counter() + 1
        msg_id = secrets.token_hex(8)  # random: the topic names no counter (it travels in the sealed header)
        privacy: dict[str, Any] = {"mode": "off"}
        meta: dict[str, str] = {}
        eps_after = None
        if self.ledger is not None and selection is not None:
            dp = self.ledger.cfg
            eps_after = selection.epsilon_after
            privacy = {
                "mode": "dp-sgd",
                "accountant": dp.accountant,
                "accounting": "per_record",
                "clip_norm": dp.max_grad_norm,
                "noise_multiplier": dp.noise_multiplier,
                "sample_rate": plan.sample_rate,
                "steps": plan.steps,
                "epsilon": eps_after,
                "delta": dp.delta,
                "unit_group": self.ledger.group,
            }
            meta["record_ledger"] = self.ledger.state_after(selection)
        encoding = cfg.update.encoding  # int8: rounded after the DP noise (post-processing), broker_bridge.quantised
        header = UpdateHeader(self.site, counter, msg_id, base.version, len(x), privacy, encoding=encoding)
        if self.cohorts is not None:
            blob = self.cohorts.seal(header, result.delta)
        else:
            tensors = quantised.encode(result.delta, encoding)
            blob = seal_update(header, tensors, self.keys, self.enrollment.aggregator.box_pub)
        try:
            dropped = await asyncio.to_thread(
                self.outbox.put,
                site=self.site,
                counter=counter,
                msg_id=msg_id,
                base_version=base.version,
                n_samples=len(x),
                epsilon=eps_after,
                blob=blob,
                meta=meta,
            )
        except OutboxFull as exc:  # filled up while training (stop_training): nothing released, nothing accounted
            self.new_rows += consumed
            self._set_publishing("outbox_full", detail=str(exc))
            self._skip("outbox_full")
            return None
        except sqlite3.Error as exc:  # e.g. disk full: rolled back, so nothing released and nothing accounted
            self.new_rows += consumed
            event(log, "update.not_queued", logging.ERROR, site=self.site, counter=counter, error=str(exc))
            self._error(f"update not queued: {exc}")
            self._skip("outbox_write_failed")
            return None
        if self.ledger is not None:
            self.ledger.commit(meta["record_ledger"])
        for d in dropped:
            self.metrics.dropped.inc()
            event(
                log,
                "outbox.dropped",
                logging.WARNING,
                site=self.site,
                counter=d.counter,
                msg_id=d.msg_id,
                reason="outbox full",
                policy=cfg.outbox.policy,
                detail="its privacy cost was paid and it will never be delivered (policy drop_oldest)",
            )
        self.personal = result.personal
        if self.personal_names:
            try:
                await asyncio.to_thread(self.store.save_personal, self.personal)
            except OSError as exc:  # kept in memory; saved with the next round
                event(log, "personal.save_failed", logging.ERROR, site=self.site, error=str(exc))
        sealed_s = time.perf_counter() - triggered
        self.last_round = {
            "counter": counter,
            "msg_id": msg_id,
            "base_version": base.version,
            "n_samples": len(x),
            "steps": plan.steps,
            "train_loss": _r(result.train_loss),
            "holdout_loss": _r(result.holdout_loss),
            "holdout_accuracy": _r(result.holdout_accuracy),
            "train_s": round(result.seconds, 3),
            "trigger_to_outbox_s": round(sealed_s, 3),
        }
        self.metrics.rounds.inc()
        self.metrics.sealed.inc()
        self.metrics.round_seconds.set(result.seconds)
        self.last_round_at = time.monotonic()
        event(
            log,
            "update.sealed",
            site=self.site,
            counter=counter,
            msg_id=msg_id,
            bytes=len(blob),
            encoding=encoding,
            epsilon=_r(eps_after),
            **{k: v for k, v in self.last_round.items() if k not in ("counter", "msg_id")},
        )
        if self.publishing != "ok":
            self._set_publishing("ok")
        self._changed()
        self._send_wake.set()
        if self.personal_names:
            await self.export_onnx()
        return msg_id

    def _select(self) -> Any:
        """The rows of the next round under per-record accounting (rows past their budget retire)."""
        assert self.ledger is not None
        t = self.cfg.training

        def plan(n: int) -> tuple[float, int]:
            p = plan_round(t.plan_rows or n, t)
            return p.sample_rate, p.steps

        return self.ledger.select(
            self.dataset, time.time(), plan, max_age_s=self.cfg.dataset.max_age_s, newest=t.max_train_rows
        )

    async def export_onnx(self) -> Path | None:
        """Write the personalised ONNX (global shared + local personal) for the line inference.

        Returns None when it could not be written (e.g. disk full): the line keeps its current model.
        """
        async with self._export_lock:
            base, personal = self.base, dict(self.personal)
            served: dict[str, Any] | None = None

            def build() -> bytes:
                nonlocal served
                model = build_model(self.spec, seed=self.cfg.model_seed)
                load_shared_state(model, self.spec, base.shared)
                if personal:
                    load_personal_state(model, self.spec, personal)
                if self.personaliser is not None:  # noise-free candidates: never sent, never trained on by DP rounds
                    from edge.personal import build as build_params

                    params, choice = self.personaliser.choose_from(self.dataset, {**base.shared, **personal})
                    model, served = build_params(self.spec, params, self.cfg.model_seed), choice.to_dict()
                return export_onnx(model, self.spec)

            onnx = await asyncio.to_thread(build)
            try:
                path = await asyncio.to_thread(
                    self.store.publish_onnx,
                    onnx,
                    site=self.site,
                    version=base.version,
                    spec=self.spec,
                    counter=self.outbox.last_counter(),
                    served=served,
                )
            except OSError as exc:
                event(log, "onnx.export_failed", logging.ERROR, site=self.site, version=base.version, error=str(exc))
                self._error(f"ONNX export failed: {exc}")
                return None
        event(
            log,
            "onnx.exported",
            site=self.site,
            version=base.version,
            path=str(path),
            bytes=len(onnx),
            served=served["kind"] if served else None,
        )
        if served:
            self._changed()
        return path

    # ------------------------------------------------------------------ sending
    async def _send_loop(self, client: MqttClient) -> None:
        """Publish queued updates in counter order, at most ``max_in_flight`` without a receipt."""
        resend, window = self.cfg.outbox.resend_after_s, self.cfg.outbox.max_in_flight
        while True:
            await client.connected.wait()
            in_flight = 0
            now = time.time()
            for row in self.outbox.rows():
                if row.sent_at is not None and row.sent_at >= now - resend:
                    in_flight += 1  # waiting for its receipt
                    continue
                if in_flight >= window:
                    break
                if not await self._publish_row(client, row):
                    break
                in_flight += 1
            self._send_wake.clear()
            try:
                await _wait_event(self._send_wake, min(resend, 5.0))
            except TimeoutError:
                pass

    async def _publish_row(self, client: MqttClient, row: Any) -> bool:
        """Publish all chunks of one update and mark it sent; False when it could not go out now."""
        topic0 = self.topics.update_chunk(self.site, row.msg_id, 0)
        chunks = split(row.blob, row.msg_id, client.chunk_limit(topic0))
        items = [(self.topics.update_chunk(self.site, row.msg_id, i), c) for i, c in enumerate(chunks)]
        try:
            await client.publish_many(items, qos=1)
        except NotConnected:
            return False  # back to waiting for the connection; the row stays queued
        except PublishRefused as exc:
            self._error(f"broker refused update {row.msg_id}: {exc}")
            event(
                log,
                "update.refused_by_broker",
                logging.ERROR,
                site=self.site,
                msg_id=row.msg_id,
                reason=exc.reason,
                code=exc.reason_code,
            )
            await asyncio.sleep(min(self.cfg.outbox.resend_after_s, 30.0))
            return False
        self.outbox.mark_sent(row.msg_id)
        self.metrics.published.inc()
        event(
            log,
            "update.published",
            site=self.site,
            counter=row.counter,
            msg_id=row.msg_id,
            chunks=len(chunks),
            attempt=row.attempts + 1,
        )
        return True

    # ------------------------------------------------------------------ receiving
    async def _receive_loop(self, client: MqttClient) -> None:
        async for msg in client.messages():
            try:
                await self.handle_message(msg)
            except Exception as exc:  # one bad message must not stop the agent
                self.metrics.malformed.labels("unexpected").inc()
                event(log, "message.failed", logging.ERROR, site=self.site, topic=msg.topic, error=repr(exc))

    async def handle_message(self, msg: Message) -> None:
        """Dispatch one message from the broker: receipts, manifests, weight chunks."""
        try:
            info = self.topics.parse(msg.topic)
        except TopicError:
            self.metrics.malformed.labels("topic").inc()
            return
        if info.kind == "receipts" and info.site == self.site:
            self._on_receipt(msg.payload)
        elif info.kind == "fedkey" and info.site == self.site:
            await self._on_grant(msg.payload)
        elif info.kind == "manifest" and msg.payload:
            await self._on_manifest(msg.payload)
        elif info.kind == "weights" and info.version is not None and msg.payload:
            try:
                self.follower.on_chunk(info.version, info.index or 0, msg.payload)
            except WireError as exc:
                self.metrics.malformed.labels("weights").inc()
                event(log, "model.chunk_dropped", logging.WARNING, site=self.site, topic=msg.topic, reason=str(exc))
                return
            await self._try_adopt()
        elif info.kind == "recovery_answer" and info.site == self.site and msg.payload:
            self._on_recovery(msg.payload)
        elif info.kind.startswith("secagg_") and self.cohorts is not None:
            await self._on_secagg(info.kind, msg.payload, info.msg_id)

    async def _on_secagg(self, kind: str, payload: bytes, cohort: str | None = None) -> None:
        """Cohort announcements start a round; survivors and requests get a sealed reply."""
        assert self.cohorts is not None
        if kind == "secagg_cohort":
            if self.cohorts.on_cohort(payload, cohort):
                # a cohort is on a new base version: with on_new_model it is a reason to train, as a new
                # version is (whichever of the two arrives last starts the round); else only new rows are
                self._rebased = self._rebased or self.cfg.training.on_new_model
                self._trigger.set()
            return
        if kind == "secagg_survivors":
            reply = self.cohorts.on_survivors(payload, cohort)
        elif kind == "secagg_request":
            reply = self.cohorts.on_request(payload)
        else:
            return
        if reply is not None and self.client is not None:
            try:
                await self.client.publish(self.topics.secagg_reply(self.site), reply, qos=1)
            except (NotConnected, PublishRefused) as exc:  # a member away now is a dropout the cohort tolerates
                event(log, "secagg.reply_unsent", logging.WARNING, site=self.site, error=str(exc))

    async def _recover_loop(self, client: MqttClient) -> None:
        """Ask the aggregator what it accepted from this site until it answers (edge.recovery).

        Again after 0.5 s, 1 s, 2 s ... up to ``resend_s``: a request sent before the aggregator subscribed is lost.
        """
        wait = 0.5
        while (recovery := self.recovery) is not None:
            await client.connected.wait()
            try:
                # the answer can arrive (and clear self.recovery) while this publish awaits its PUBACK
                await client.publish(self.topics.recovery_request(self.site), recovery.request(), qos=1)
                event(log, "recovery.asked", site=self.site, attempt=recovery.asked)
            except (NotConnected, PublishRefused) as exc:
                event(log, "recovery.not_asked", logging.WARNING, site=self.site, error=str(exc))
            await asyncio.sleep(wait)
            wait = min(2 * wait, self.cfg.recovery.resend_s)

    def _on_recovery(self, payload: bytes) -> None:
        if self.recovery is None:
            return  # answered already (a duplicate answer)
        try:
            answer = self.recovery.open(payload)
        except WireError as exc:
            self.metrics.malformed.labels("recovery").inc()
            event(log, "recovery.answer_refused", logging.WARNING, site=self.site, reason=str(exc))
            return
        self.recovery.apply(answer, self.outbox, self.dp, self._privacy_group())
        self.recovery = None
        self.ledger = self._open_ledger() if self.dp else None
        self._set_publishing("ok")
        self._trigger.set()  # rows that arrived meanwhile may train now

    def _on_receipt(self, payload: bytes) -> None:
        try:
            doc = open_receipt(payload, self.keys, self.enrollment.aggregator.sign_pub)  # checks the site
        except WireError as exc:
            self.metrics.malformed.labels("receipt").inc()
            event(log, "receipt.dropped", logging.WARNING, site=self.site, reason=str(exc))
            return
        verdict, reason = doc["verdict"], doc.get("reason")
        found = self.outbox.settle(doc["counter"], doc["msg_id"], verdict, reason, doc.get("version"))
        self.metrics.receipts.labels(verdict).inc()
        level = logging.WARNING if verdict in ("stale", "rejected") else logging.INFO
        event(
            log,
            f"receipt.{verdict}",
            level,
            site=self.site,
            counter=doc["counter"],
            msg_id=doc["msg_id"],
            reason=reason,
            version=doc.get("version"),
            matched=found,
        )
        if verdict in ("stale", "rejected"):
            self.last_error = f"update {doc['counter']} {verdict}: {reason}"
        self._changed()
        self._send_wake.set()  # the next update may go out now
        if found and self.publishing == "outbox_full":
            self._trigger.set()  # stop_training: room again, so train now rather than at the next timer

    def _wants(self, version: int) -> bool:
        """Newer than ours; or the aggregator's own version 0 while we only have the one we built."""
        return version > self.base.version or (version == self.base.version and not self.base.manifest)

    async def _on_grant(self, blob: bytes) -> None:
        if not blob:
            event(
                log,
                "fedkey.cleared",
                logging.WARNING,
                site=self.site,
                detail="the aggregator took this site's key grant back (revoked?)",
            )
            return
        try:
            epoch = self.follower.on_grant(blob)
        except WireError as exc:
            self.metrics.malformed.labels("fedkey").inc()
            event(log, "fedkey.dropped", logging.WARNING, site=self.site, reason=str(exc))
            return
        event(log, "fedkey.received", site=self.site, epoch=epoch)
        waiting = self.follower.take_waiting()
        if waiting is not None:
            await self._on_manifest(waiting)
        for kind, payload, cohort in self.cohorts.take_waiting() if self.cohorts is not None else ():
            await self._on_secagg(kind, payload, cohort)

    async def _on_manifest(self, sealed: bytes) -> None:
        try:
            version = self.follower.on_manifest(sealed)
        except ModelRefused as exc:
            self._refuse(exc.version, f"{exc.reason}: {exc.detail}")
            return
        if version is None:  # not newer, or its grant has not arrived yet (kept for it)
            if self.follower.waiting_for_key:
                event(log, "model.waiting_for_key", logging.INFO, site=self.site)
            return
        chunks = self.follower.pending[2]["weights"]["chunks"] if self.follower.pending else None
        event(log, "model.announced", site=self.site, version=version, chunks=chunks)
        await self._try_adopt()

    async def _try_adopt(self) -> None:
        try:
            g = self.follower.complete()
        except ModelRefused as exc:
            self._refuse(exc.version, f"{exc.reason}: {exc.detail}")
            return
        if g is None:
            return
        far = self.cfg.adopt.refusal(self.base.shared, g.shared, g.version - self.base.version)
        if far is not None:  # signed, yet too far from the model in use (models.step_bound)
            self.metrics.models_refused_step.inc()
            self.model_refused = {"version": g.version, "reason": "step"}
            self._refuse(g.version, far)
            return
        self.base = g
        try:
            await asyncio.to_thread(self.store.save_global, g)
        except OSError as exc:  # used now; after a restart the agent falls back to the last one saved
            event(log, "model.save_failed", logging.ERROR, site=self.site, version=g.version, error=str(exc))
        self.metrics.models_loaded.inc()
        event(log, "model.loaded", site=self.site, version=g.version)
        self._changed()
        await self.export_onnx()
        if self.cfg.training.on_new_model and g.version > 0:
            self._rebased = True
            self._trigger.set()
        elif self.cohorts is not None and self.cohorts.ready(g.version) is not None:
            self._trigger.set()  # a cohort was waiting for this base

    def _refuse(self, version: int | None, reason: str) -> None:
        self.metrics.models_refused.inc()
        event(
            log,
            "model.refused",
            logging.WARNING,
            site=self.site,
            version=version,
            reason=reason,
            keeping=self.base.version,
        )
        self._error(f"model {version} refused: {reason}")

    # ------------------------------------------------------------------ status
    async def _publish_status(self, client: MqttClient, state: str = "online", timeout: float | None = None) -> None:
        self._refresh_gauges()
        payload = json.dumps(self.status(state)).encode()
        await client.publish(self.topics.status(self.site), payload, qos=1, retain=True, timeout=timeout)

    async def _on_connect(self, client: MqttClient) -> None:
        self._changed()
        self._send_wake.set()

    async def _status_loop(self, client: MqttClient) -> None:
        while True:
            try:
                await _wait_event(self._status_dirty, self.cfg.status_interval_s)
            except TimeoutError:
                pass
            self._status_dirty.clear()
            if not client.connected.is_set():
                await client.connected.wait()
            try:
                await self._publish_status(client)
            except (NotConnected, PublishRefused) as exc:
                event(log, "status.not_published", logging.DEBUG, site=self.site, error=str(exc))
            await asyncio.sleep(0.2)  # coalesce bursts of changes

    # ------------------------------------------------------------------ run
    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (or the task is cancelled); the stores stay on disk."""
        stop = stop or asyncio.Event()
        self._announce()
        self.metrics_port = self.metrics.serve(self.cfg.metrics, self.cfg.file)
        await self.export_onnx()  # the line gets what this site holds now (a crash may have left it behind)
        will = will_message(
            self.topics.status(self.site), json.dumps({"state": "offline", "reason": "connection lost"}).encode()
        )
        client = MqttClient(self.settings, will=will, on_connect=self._on_connect)
        self.client = client
        try:
            async with client:
                await client.subscribe(self.topics.receipts(self.site), qos=1)
                if self.recovery is not None:
                    await client.subscribe(self.topics.recovery_answer(self.site), qos=1)
                # the manifest and the weights, not the aggregator's ONNX: this agent builds its own from the
                # weights (with its personal head), so downloading every version's ONNX too only costs the link
                await client.subscribe(self.topics.fedkey(self.site), qos=1)
                await client.subscribe(self.topics.manifest(), qos=1)
                await client.subscribe(self.topics.weights_filter(), qos=1)
                for topic in self.cohorts.subscriptions() if self.cohorts is not None else ():
                    await client.subscribe(topic, qos=1)
                tasks = {
                    asyncio.create_task(c, name=f"edge:{self.site}:{n}")
                    for n, c in [
                        ("ingest", self._ingest()),
                        ("train", self._train_loop()),
                        ("send", self._send_loop(client)),
                        ("receive", self._receive_loop(client)),
                        ("status", self._status_loop(client)),
                        ("recover", self._recover_loop(client)),
                    ]
                }

                async def farewell() -> None:
                    if client.connected.is_set():
                        await self._publish_status(client, "offline", timeout=2.0)

                await run_until_stopped(tasks, stop, farewell, service="edge", site=self.site)
        finally:
            self.client = None
            self.metrics.stop()
            event(log, "edge.stopped", site=self.site)

    def _announce(self) -> None:
        event(
            log,
            "edge.starting",
            site=self.site,
            federation=self.cfg.federation,
            model=self.spec.kind,
            version=self.base.version,
            rows=len(self.dataset),
            outbox=self.outbox.depth()[0],
            counter=self.outbox.last_counter(),
            epsilon=round(self.epsilon, 4),
        )
        if self.dp is None:
            event(
                log,
                "privacy.off",
                logging.WARNING,
                site=self.site,
                detail='privacy = "off": updates carry NO differential privacy guarantee for the plant\'s records',
            )
        elif self.cfg.training.every_rows or self.cfg.training.max_train_rows:
            event(
                log,
                "privacy.count_schedule",
                logging.WARNING,
                site=self.site,
                detail="training.every_rows / max_train_rows make rounds or their rows depend on row counts; the "
                "per-record guarantee's argument assumes rounds by time or version (docs/architecture.md)",
            )

    def close(self) -> None:
        """Close the stores (after :meth:`run` has returned)."""
        self.dataset.close()
        self.outbox.close()
        if self.cohorts is not None:
            self.cohorts.close()


def _r(v: float | None) -> float | None:
    return None if v is None or v != v else round(float(v), 6)


async def run_agent(config: EdgeConfig | str | Path, stop: asyncio.Event | None = None) -> None:
    """Run one edge agent from a config (object or path to ``site.toml``) until ``stop`` is set."""
    cfg = config if isinstance(config, EdgeConfig) else load_edge_config(config)
    agent = EdgeAgent(cfg)
    try:
        await agent.run(stop)
    finally:
        agent.close()
