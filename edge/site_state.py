"""What the edge agent's tasks share: the site's identity, its stores on disk, the model in use, and the events
by which one task wakes another.

Why one object: the agent's tasks (``edge.ingest``, ``edge.rounds``, ``edge.sender``, ``edge.adopt``,
``edge.status_publisher``, ...) run concurrently in one asyncio loop and hand work to each other through this
state: new rows wake a round, a round wakes the sender, a receipt makes room in the outbox and wakes a round, a
new model wakes a round. Keeping the shared state and the few rules that span tasks here (a change refreshes the
gauges and the status; the publishing state; the privacy ledger) lets each task be a small class that owns only
its own behaviour, and the agent be the wiring.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np

from broker_bridge import layouts
from broker_bridge.client import MqttClient
from broker_bridge.federation_key import Keyring
from broker_bridge.keys import Enrollment, KeyPair
from broker_bridge.topics import Topics
from edge.config import EdgeConfig
from edge.dataset import Dataset
from edge.ledger_privacy import RecordLedger, window_group
from edge.metrics import EdgeMetrics
from edge.model_store import GlobalModel, ModelStore
from edge.outbox import Outbox
from edge.privacy import PrivacyBudget
from edge.recovery import Recovery, needs_recovery
from edge.secagg_member import EdgeCohorts
from fedline.config import ConfigError
from fedline.logs import event
from models import build_model
from models.flat import personal_state, shared_state, split_names

log = logging.getLogger("fedline.edge")


async def wait_event(ev: asyncio.Event, timeout: float) -> None:
    """Wait for ``ev`` at most ``timeout`` seconds. Not ``asyncio.wait_for``: on Python 3.11 it can swallow
    a cancellation that arrives as the event is set, and the loop around it then never stops."""
    try:
        async with asyncio.timeout(timeout):
            await ev.wait()
    except TimeoutError:
        pass


def load_identity(cfg: EdgeConfig) -> tuple[KeyPair, Enrollment]:
    """This site's key pair and enrollment, refused (naming the key) when they are another site's or federation's."""
    keys = KeyPair.load(cfg.path(cfg.keys.private))
    if keys.ident != cfg.site or keys.role != "site":
        raise ConfigError(
            cfg.file, "keys.private", f"key file is for {keys.role} {keys.ident!r}, not site {cfg.site!r}"
        )
    enrollment = Enrollment.load(cfg.path(cfg.keys.enrollment))
    if enrollment.federation != cfg.federation:
        raise ConfigError(
            cfg.file,
            "keys.enrollment",
            f"enrollment is for federation {enrollment.federation!r}, not {cfg.federation!r}",
        )
    return keys, enrollment


class SiteState:
    """One site's shared state: construct it (opens the stores, lays out the model), then hand it to the tasks."""

    def __init__(self, cfg: EdgeConfig, keys: KeyPair, enrollment: Enrollment, mapping: Any) -> None:
        self.cfg, self.site, self.spec, self.dp = cfg, cfg.site, cfg.model, cfg.dp
        self.keys, self.enrollment = keys, enrollment
        self.topics = Topics(cfg.federation, cfg.topic_prefix)
        self.mapping = mapping  # the [rows] table (edge.config.row_mapping): windows decide the privacy group
        self.metrics = EdgeMetrics(cfg.site)
        self._open_stores(cfg)
        self._lay_out_model(cfg)
        self.model_refused: dict[str, Any] | None = None  # the last version refused as too far a step
        self.new_rows = 0  # rows stored since the last round
        self.last_round_at = time.monotonic()
        self.publishing = "recovering" if self.recovery else "ok"  # ok | budget_exhausted | outbox_full | recovering
        self.last_error: str | None = None
        self.last_round: dict[str, Any] = {}
        self.client: MqttClient | None = None
        self.sources_done = False
        self.rebased = False  # a new global version arrived (training.on_new_model)
        self.first_round_pending = True  # no round yet since start (edge.ingest: a backlog that is in)
        self.wake_train = asyncio.Event()  # new rows, a new model, room in the outbox: a round may start
        self.wake_send = asyncio.Event()  # an update queued or settled: the sender looks again
        self.status_dirty = asyncio.Event()  # something in the status changed: publish it

    def _open_stores(self, cfg: EdgeConfig) -> None:
        """The dataset, outbox, privacy ledger, model store and cohort state on disk (the order matters: the
        ledger reads the outbox and the dataset; an empty outbox means a lost data dir to recover)."""
        data_dir = cfg.path(cfg.data_dir)
        self.dataset = Dataset(
            data_dir / "dataset.sqlite",
            self.spec.input_shape,
            None if self.spec.task == "anomaly" else self.spec.n_outputs,
            cfg.dataset.max_rows,
            cfg.dataset.holdout_fraction,
            cfg.dataset.effective_split,
        )
        self.outbox = Outbox(data_dir / "outbox.sqlite", cfg.outbox.max_bytes, cfg.outbox.max_count, cfg.outbox.policy)
        # an empty state (new or lost data dir): nothing is trained or sent before the aggregator's answer
        self.recovery: Recovery | None = (
            Recovery(self.keys, self.enrollment, cfg.federation, gap=cfg.outbox.max_count)
            if cfg.recovery.ask_aggregator and needs_recovery(self.outbox)
            else None
        )
        self.ledger: RecordLedger | None = self.open_ledger() if self.dp else None
        self.store = ModelStore(data_dir, cfg.path(cfg.model_dir))
        self.keyring = Keyring()  # federation content keys by epoch, from this site's grants
        self.cohorts = (
            EdgeCohorts(self.keys, self.enrollment, self.topics, data_dir, self.keyring)
            if cfg.secure_aggregation
            else None
        )

    def _lay_out_model(self, cfg: EdgeConfig) -> None:
        """The model's layers as the aggregator builds them: which are shared, their shapes, version 0, and this
        site's personal layers (from disk, or fresh when the stored ones no longer match the spec)."""
        template = build_model(self.spec, seed=cfg.model_seed)
        try:
            self.shared_names, self.personal_names = split_names(self.spec, template)
        except ValueError as exc:  # a personal prefix that names nothing, or everything
            raise ConfigError(cfg.file, "model.personal", str(exc)) from None
        self.shapes = {n: tuple(p.shape) for n, p in template.named_parameters()}
        # the tables FLT2 names by id (updates sent, weights and int8 steps read), from this site's own spec
        layouts.register_model({n: self.shapes[n] for n in self.shared_names})
        self.base = GlobalModel(0, {}, b"", b"", shared_state(template, self.spec))  # version 0, as the aggregator's
        personal = self.store.load_personal()
        if personal and set(personal) != set(self.personal_names):
            event(
                log,
                "personal.reset",
                logging.WARNING,
                site=self.site,
                reason="stored personal names differ from the spec",
            )
            personal = None
        self.personal: dict[str, np.ndarray] = personal or personal_state(template, self.spec)  # never sent

    # ------------------------------------------------------------------ privacy
    def privacy_group(self) -> int:
        """How many rows one raw sample can be in (overlapping windows): the ledger's group size."""
        m = self.mapping
        return window_group(m.window, m.stride) if m.aggregate_s is None else 1

    def open_ledger(self) -> RecordLedger:
        """The per-record privacy ledger from the outbox (an old global accountant is carried over)."""
        assert self.dp is not None
        group = self.privacy_group()
        state, legacy = self.outbox.get_meta("record_ledger"), self.outbox.get_meta("accountant")
        try:
            if state is None and legacy:  # every row stored so far may have been in every past release
                old = PrivacyBudget(self.dp, legacy)
                return RecordLedger.from_global_history(self.dp, group, old.history, self.dataset.last_id())
            return RecordLedger(self.dp, group, state)
        except ValueError as exc:
            raise ConfigError(self.cfg.file, "privacy", str(exc)) from None

    @property
    def epsilon(self) -> float:
        """The per-record guarantee: the largest ε of any row this site ever trained on."""
        return self.ledger.epsilon if self.ledger else 0.0

    # ------------------------------------------------------------------ changes every task reports
    def refresh_gauges(self) -> None:
        """The site's own figures on /metrics, from the state now."""
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

    def changed(self) -> None:
        """Something the status or the gauges show changed: refresh the gauges, publish the status soon."""
        self.refresh_gauges()
        self.status_dirty.set()

    def error(self, text: str) -> None:
        """Keep the last error for the operator (its event is logged where it happened) and report the change."""
        self.last_error = text
        self.changed()

    def set_publishing(self, state: str, **fields: Any) -> None:
        """ok | budget_exhausted | outbox_full | recovering: logged once per change, shown in the status."""
        if state != self.publishing:
            level = logging.INFO if state == "ok" else logging.WARNING
            event(log, f"publishing.{state}", level, site=self.site, **fields)
            self.publishing = state
        self.changed()

    def close(self) -> None:
        """Close the stores (after the agent's run has returned)."""
        self.dataset.close()
        self.outbox.close()
        if self.cohorts is not None:
            self.cohorts.close()
