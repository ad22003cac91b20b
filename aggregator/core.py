"""The aggregator without MQTT: sealed bytes in, signed verdicts and new versions out.

Why a core apart from the service: the math and the durability can be
tested (and benchmarked) on bytes alone, while the broker path has its own
tests against a real Mosquitto. The service (:mod:`aggregator.service`) only
moves bytes between the broker and this class.

Work is split in two stages:

1. :meth:`AggregatorCore.open` — decrypt (SealedBox), verify (Ed25519),
   parse, and validate content (names, shapes, dtype, finite, norm, samples).
   It reads only immutable state, so it runs in a thread pool: NaCl, BLAKE2b
   and numpy all release the GIL, and both cores work.
2. :meth:`AggregatorCore.decide` — serial: duplicates and replays against the
   durable store, staleness against the live version, then buffer or reduce,
   commit, and only then swap the in-memory model.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aggregator import fairness
from aggregator.config import AggregatorConfig
from aggregator.metrics import Metrics
from aggregator.normbound import effective_bounds
from aggregator.opener import Opened, open_update, read_update
from aggregator.recovery import SiteHistory
from aggregator.site_rate import SiteRate
from aggregator.store import BufferedRow, Store, Verdict
from aggregator.strategies import Accepted, make_strategy
from broker_bridge import envelope, layouts, quantised
from broker_bridge.envelope import UpdateHeader
from broker_bridge.errors import FedlineError, WireError
from broker_bridge.keys import Enrollment, KeyPair
from broker_bridge.quantised import Int8Delta
from fedline.logs import event
from fedline.threadname import name_os_thread

log = logging.getLogger("fedline.aggregator")

State = dict[str, np.ndarray]


class StateError(FedlineError):
    """The state directory cannot be used with this configuration."""


@dataclass
class Decision:
    """Result of stage 2: this update's receipt, receipts of buffered updates it flushed, the new version."""

    receipt: dict[str, Any]
    flushed: list[dict[str, Any]] = field(default_factory=list)
    new_version: int | None = None
    duplicate: bool = False

    @property
    def receipts(self) -> list[dict[str, Any]]:
        return [self.receipt, *self.flushed]


GROUP_MAX = 16  # decisions in one group commit at most: receipts wait for the commit


OPEN_BATCH = 4  # updates per task of the opening pool: a hand-off between threads per update cost CPU


def _batches(items: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    """``items`` in lists of ``size`` (the last one shorter)."""
    run: list[bytes] = []
    for item in items:
        run.append(item)
        if len(run) == size:
            yield run
            run = []
    if run:
        yield run


def _whole_group(pending: deque[tuple[Future[list[Opened]], int]], left: Sequence[Opened] = ()) -> list[Opened]:
    """``left`` (what the last group commit left undecided), then the oldest batches, up to :data:`GROUP_MAX`
    updates, each waited for: one group commit (:meth:`AggregatorCore.process_stream`)."""
    ops = list(left)
    if not ops:
        future, _ = pending.popleft()
        ops = future.result()
    while pending and len(ops) + pending[0][1] <= GROUP_MAX:
        ops += pending.popleft()[0].result()
    return ops


def _copy_state(state: Mapping[str, np.ndarray]) -> State:
    return {k: np.array(v, dtype=np.float32, copy=True) for k, v in state.items()}


class AggregatorCore:
    """Aggregator state and decisions. Not thread-safe for :meth:`decide`; :meth:`open` is."""

    def __init__(
        self,
        cfg: AggregatorConfig,
        *,
        keys: KeyPair | None = None,
        enrollment: Enrollment | None = None,
        metrics: Metrics | None = None,
        reopen: Callable[[bytes], tuple[UpdateHeader, Mapping[str, np.ndarray]]] | None = None,
    ) -> None:
        a = cfg.aggregator
        self.cfg = cfg
        self.spec = cfg.model
        self.keys = keys or KeyPair.load(a.key_file)
        self.enrollment = enrollment or Enrollment.load(a.enrollment_file)
        if self.keys.role != "aggregator":
            raise StateError(f"{a.key_file}: a {self.keys.role} key, the aggregator needs its own key")
        if self.enrollment.federation != a.federation:
            raise StateError(
                f"{a.enrollment_file}: enrollment is for federation "
                f"{self.enrollment.federation!r}, config says {a.federation!r}"
            )
        if self.enrollment.aggregator.sign_pub != self.keys.public().sign_pub:
            raise StateError(f"{a.enrollment_file}: the enrolled aggregator key is not {a.key_file}")
        self.metrics = metrics or Metrics()
        # how a buffered row's stored bytes are read back at start: a site's sealed update, or (with intake
        # workers) the forward a worker sealed to this process (aggregator.reducer)
        self.reopen = reopen or (lambda blob: read_update(blob, self.keys, self.enrollment))
        self.strategy = make_strategy(cfg.strategy, len(self.enrollment.sites))
        fairness.check_federation(cfg.strategy, self.strategy, len(self.enrollment.sites), a.enrollment_file)
        self.store = Store(Path(a.state_dir) / "aggregator.sqlite", fsync=a.fsync)
        # what each site released, for a site that lost its data directory (aggregator.recovery)
        self.history = SiteHistory(self.store)
        self.pool = ThreadPoolExecutor(a.workers, thread_name_prefix="agg-open", initializer=name_os_thread)
        self.site_rate = SiteRate(cfg.strategy.site_interval_s if cfg.strategy.kind == "fedasync" else 0.0)
        if self.site_rate.interval_s > 0:  # the rate outlives a restart (aggregator.site_rate)
            self.site_rate.restore(self.store.last_applied(), time.time())
        self._torch_model: Any = None
        self._seed_params: Any = False  # the seed's parameters for the ONNX (_onnx_seed); False: not looked at yet
        self.evaluator = self._load_evaluation(cfg)
        self._load_or_seed()
        n_params = sum(int(v.size) for v in self.model.values())
        self.norm_bound, self.max_norm = effective_bounds(cfg, n_params)
        self.strategy.norm_bound = self.norm_bound
        event(
            log,
            "aggregator.bounds",
            norm_bound=round(self.norm_bound, 6),
            max_norm=round(self.max_norm, 6),
            derived=cfg.strategy.norm_bound is None,
            min_sites=cfg.strategy.min_sites,
            buffer_size=self.strategy.buffer_size,
            reduce=self.strategy.reduce_stat,  # robust = "auto": MDA where it can run (reduce_choice)
        )
        self.metrics.reduce.labels(self.strategy.reduce_stat).set(1)

    def _load_evaluation(self, cfg: AggregatorConfig) -> Any:
        """The ``[evaluation]`` rows, loaded now so a bad table fails at start (and FLTrust's root dataset)."""
        if cfg.evaluation is None:
            return None
        from aggregator.evaluation import Evaluator

        seed = cfg.aggregator.seed
        evaluator = Evaluator(cfg.evaluation, self.spec, seed, cfg.file)
        if self.strategy.reduce_stat == "fltrust":  # the [evaluation] rows are FLTrust's root dataset
            from aggregator.root_update import RootUpdate

            self.strategy.reference = RootUpdate(self.spec, evaluator.x, evaluator.y, cfg.dp, seed)
        return evaluator

    # -- state ------------------------------------------------------------------
    def _load_or_seed(self) -> None:
        """The model, momentum and buffer from the state dir; a new state dir is seeded with version 0."""
        spec_json = json.dumps(self.spec.to_dict(), sort_keys=True)
        self._check_state_dir(spec_json)
        ckpt = self.store.latest_checkpoint()
        if ckpt is None:
            self._seed(spec_json)
        else:
            assert ckpt.weights is not None
            self.version = ckpt.version
            self.model = _copy_state(envelope.decode_tensors(ckpt.weights))
            self.momentum = _copy_state(envelope.decode_tensors(ckpt.momentum)) if ckpt.momentum else None
        self.snapshot = (self.version, self.model)
        self._step: tuple[int, int, State, State] | None = None  # (version, parent, int8 block, model it made)
        self.reference = {k: tuple(v.shape) for k, v in self.model.items()}
        layouts.register_model(self.reference)  # FLT2 updates name these tables by id (before the buffer is read)
        self._top: dict[str, int | None] = {}
        self.buffer: list[Accepted] = self._read_buffer()
        self.buffer_since: float | None = None  # monotonic time the current buffer got its first update
        if self.buffer:  # restarted: the timeout counts from now, the wait before the crash is unknown
            self.buffer_since = time.monotonic()
        self.metrics.version.set(self.version)
        self.metrics.buffer_fill.set(len(self.buffer))
        event(log, "aggregator.resumed", version=self.version, buffered=len(self.buffer), strategy=self.strategy.name)

    def _check_state_dir(self, spec_json: str) -> None:
        """Refuse a state dir made for another model or seed: the edges built version 0 from the first."""
        saved = self.store.get_meta("spec")
        if saved is not None and saved != spec_json:
            raise StateError(
                f"state dir {self.cfg.aggregator.state_dir} holds a model with spec {saved}, "
                f"the config's [model] is {spec_json}; use another state_dir"
            )
        saved_seed = self.store.get_meta("seed")
        if saved_seed is not None and int(saved_seed) != self.cfg.aggregator.seed:
            raise StateError(
                f"state dir {self.cfg.aggregator.state_dir} was seeded with seed {saved_seed}, "
                f"the config says {self.cfg.aggregator.seed}; edges built version 0 from the first"
            )

    def _seed(self, spec_json: str) -> None:
        """Version 0, built from the seed exactly as every edge builds it, committed with the spec and seed."""
        from models.version0 import seed_shared_state

        # without torch where models.seed_init covers the model (bit for bit torch's initialisation)
        state = seed_shared_state(self.spec, self.cfg.aggregator.seed)
        self.store.set_meta("spec", spec_json)
        self.store.set_meta("seed", str(self.cfg.aggregator.seed))
        self.store.commit_version(
            0,
            envelope.encode_tensors(state),
            None,
            {"seed": self.cfg.aggregator.seed, "strategy": self.strategy.name, "updates": []},
            [],
            self.cfg.aggregator.keep_checkpoints,
        )
        self.version, self.model, self.momentum = 0, state, None
        event(log, "aggregator.seeded", version=0, seed=self.cfg.aggregator.seed)

    def _read_buffer(self) -> list[Accepted]:
        """The buffered updates of before a restart, opened again (one no longer readable is logged and left)."""
        buffer: list[Accepted] = []
        for row, sealed in self.store.buffered():
            try:
                _header, tensors = self.reopen(sealed)
            except WireError as exc:  # e.g. the site was revoked since; its update cannot be used
                event(
                    log,
                    "aggregator.buffer_unreadable",
                    level=logging.ERROR,
                    site=row.site,
                    counter=row.counter,
                    error=str(exc),
                )
                continue
            buffer.append(
                Accepted(
                    row.site,
                    row.counter,
                    row.msg_id,
                    row.base_version,
                    row.n_samples,
                    row.staleness,
                    row.factor,
                    row.weight,
                    tensors if isinstance(tensors, Int8Delta) else _copy_state(tensors),
                    tensors.norm() if isinstance(tensors, Int8Delta) else None,  # the norm it was decided with
                )
            )
        return buffer

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.store.close()

    # -- stage 1: open and validate (thread-safe) -------------------------------------
    def open(self, sealed: bytes, topic_site: str | None = None, msg_id: str | None = None) -> Opened:
        return open_update(
            sealed,
            cfg=self.cfg,
            keys=self.keys,
            enrollment=self.enrollment,  # one reference read: a reload swaps it whole
            reference=self.reference,
            max_norm=self.max_norm,
            topic_site=topic_site,
            msg_id=msg_id,
        )

    def open_many(self, items: Iterable[bytes]) -> list[Opened]:
        """Open several sealed updates in parallel (results in input order)."""
        return list(self.pool.map(self.open, items))

    def process_stream(self, items: Iterable[bytes], batch: int = OPEN_BATCH) -> Iterator[Decision]:
        """Open batches of ``batch`` updates in the pool while deciding earlier ones in order, in groups.

        Opening (most of the work) overlaps with the serial decisions, so both cores stay busy. The oldest
        batches are decided together, up to :data:`GROUP_MAX` updates, in one commit (:func:`_whole_group`),
        waiting for those of them still being opened, while ``workers`` more batches are being opened. A group
        ends at the update that makes a version (:meth:`decide_group`); the updates after it open the next
        group. So a version's updates are decided in the group that makes it and their bytes are never
        appended (the version holds them): groups of up to 16 cut across versions and appended about a quarter
        of the updates at K = 10 (BENCHMARKS.md, "intake19h"); whole groups instead of greedy ones (only what
        was opened already) had cost 5-7 % more CPU per update at 100k parameters ("intake19g"). A pool task
        opens a whole batch: handing each update to a thread and back (a future, a wake-up, its bytes moving
        between cores) cost 0.1-0.2 ms of CPU per update at 100k parameters (BENCHMARKS.md).
        """
        size = max(1, min(batch, GROUP_MAX))
        ahead = self.cfg.aggregator.workers + max(1, GROUP_MAX // size)  # batches being opened at most
        pending: deque[tuple[Future[list[Opened]], int]] = deque()
        left: list[Opened] = []
        for run in _batches(items, size):
            pending.append((self.pool.submit(self._open_batch, run), len(run)))
            while len(pending) >= ahead:  # a group may take no batch (it ended early): never more ahead
                decisions, left = self.decide_group(_whole_group(pending, left))
                yield from decisions
        while pending or left:
            decisions, left = self.decide_group(_whole_group(pending, left))
            yield from decisions

    def _open_batch(self, items: Sequence[bytes]) -> list[Opened]:
        return [self.open(item) for item in items]

    # -- stage 2: decide (serial) ---------------------------------------------------------
    def decide_many(self, ops: Sequence[Opened]) -> list[Decision]:
        """Decide ``ops`` in order with one commit for all of them (group commit: ``Store.grouped``).

        Returns only after that commit, so no receipt says a verdict that is not durable. If a decision or
        the commit fails, nothing of the group is kept: the buffer and the decided counters are read back
        from the store (as after a restart) and the error is raised; the sites resend for lack of receipts.
        """
        return self._grouped(ops, until_version=False)

    def decide_group(self, ops: Sequence[Opened]) -> tuple[list[Decision], list[Opened]]:
        """:meth:`decide_many` up to and including the first update that makes a version; (its decisions, the
        updates left undecided, for the caller's next group).

        Why stop there: a group's buffered updates have their sealed bytes appended at its commit unless a version
        in the same group holds them. Past a version the group's updates start the next buffer, and their bytes
        (400 KB each at 100k parameters) would be written only for that buffer's own version to make them
        unneeded; in the next group they are decided with that version. A group of rejections ends only at
        :data:`GROUP_MAX`, as before.
        """
        decisions = self._grouped(ops, until_version=True)
        return decisions, list(ops[len(decisions) :])

    def _grouped(self, ops: Sequence[Opened], until_version: bool) -> list[Decision]:
        """The decisions of ``ops`` in one group commit (the next ones left out after a version when
        ``until_version``); on a failure the store's state is read back and the error raised."""
        decisions: list[Decision] = []
        try:
            with self.store.grouped():
                for op in ops:
                    decisions.append(self.decide(op))
                    if until_version and decisions[-1].new_version is not None:
                        break
            return decisions
        except BaseException:
            self._reload_decided()
            raise

    def _reload_decided(self) -> None:
        """The buffer and the decided counters as the store holds them (a group commit failed)."""
        self._top = {}
        self.history.reload()
        self.buffer = self._read_buffer()
        self.buffer_since = time.monotonic() if self.buffer else None
        self.metrics.buffer_fill.set(len(self.buffer))

    def decide(self, op: Opened) -> Decision:
        """This update's verdict, in order: duplicate, replay, refused content, staleness; then buffer or reduce."""
        h = op.header
        if h is None:  # refused before we knew site and counter: answer on the topic's site
            return self._refuse(
                op.topic_site or "?", -1, op.msg_id or "?", op.reason or "schema", op.detail, store=False
            )
        seen = self._seen_before(h)
        if seen is not None:
            return seen
        # a release the site paid privacy for, noted in its verdict's transaction (aggregator.recovery)
        self.history.note_with_decision(h)
        if op.reason is not None:
            return self._refuse(h.site, h.counter, h.msg_id, op.reason, op.detail)
        s = self.version - h.base_version
        if s < 0:
            return self._refuse(
                h.site,
                h.counter,
                h.msg_id,
                "base_version",
                f"base version {h.base_version} is newer than the current {self.version}",
            )
        self.metrics.staleness.observe(s)
        if s > self.cfg.strategy.max_staleness:
            return self._too_stale(h, s)
        acc = self._accepted(op, h, s)
        if self.strategy.needs_base:
            acc.base = self._base_model(h.base_version)
            if acc.base is None:
                return self._stale(
                    h,
                    s,
                    "base_unavailable",
                    f"version {h.base_version}'s checkpoint is no longer "
                    f"kept (keep_checkpoints {self.cfg.aggregator.keep_checkpoints})",
                )
        # one update per site per buffer (issue 14): a newer update from a site takes its older one's place
        old = self._buffered_of(h.site)
        if len(self.buffer) + (0 if old is not None else 1) < self.strategy.arrivals:
            return self._buffer(op, acc, old)
        return self._reduce([*self.buffer, acc])

    def _buffered_of(self, site: str) -> Accepted | None:
        """``site``'s update in the buffer, if one is there (a loop: ``next()`` over a generator cost twice as much)."""
        for u in self.buffer:
            if u.site == site:
                return u
        return None

    def _seen_before(self, h: UpdateHeader) -> Decision | None:
        """A duplicate gets its first receipt again; a counter below the site's highest and unknown is a replay."""
        top = self._top[h.site] if h.site in self._top else self._top_counter(h.site)
        prev = self.store.verdict(h.site, h.counter) if top is not None and h.counter <= top else None
        if prev is not None:
            self.metrics.duplicates.inc()
            if log.isEnabledFor(logging.INFO):  # per update: no fields built for a filtered line
                event(log, "update.duplicate", site=h.site, counter=h.counter, verdict=prev.verdict)
            return Decision(prev.receipt(), duplicate=True)
        if top is not None and h.counter < top:
            return self._refuse(
                h.site,
                h.counter,
                h.msg_id,
                "replay",
                f"counter {h.counter} is below {top}, already decided, and unknown",
                store=False,
            )
        return None

    def _too_stale(self, h: UpdateHeader, s: int) -> Decision:
        """Trained on a version more than ``max_staleness`` behind: stale, never buffered."""
        v = Verdict(
            h.site,
            h.counter,
            h.msg_id,
            "stale",
            "too_stale",
            f"staleness {s} > max_staleness {self.cfg.strategy.max_staleness}",
            self.version,
            s,
            0.0,
        )
        self.store.record(v)
        self._decided(h.site, h.counter)
        self.metrics.decided("stale")
        if log.isEnabledFor(logging.INFO):
            event(log, "update.stale", site=h.site, counter=h.counter, staleness=s)
        return Decision(v.receipt())

    def _accepted(self, op: Opened, h: UpdateHeader, s: int) -> Accepted:
        """The update as the strategy weighs it: its staleness factor, weight and this site's rate."""
        assert op.tensors is not None
        return Accepted(
            h.site,
            h.counter,
            h.msg_id,
            h.base_version,
            h.n_samples,
            s,
            self.strategy.factor(s),
            self.strategy.weight(h.n_samples, s),
            op.tensors,
            op.norm,
            rate=self.site_rate.scale(h.site),
        )

    def _buffer(self, op: Opened, acc: Accepted, old: Accepted | None) -> Decision:
        """Keep the update for the next reduce (durably, before its receipt), in place of its site's older one."""
        h, s = op.header, acc.staleness
        assert h is not None
        superseded = None
        if old is not None:
            superseded = Verdict(
                old.site,
                old.counter,
                old.msg_id,
                "stale",
                "superseded",
                f"counter {h.counter} from the same site took its place in the buffer",
                self.version,
                old.staleness,
                0.0,
            )
        reason = "late" if self.strategy.name == "fedavg" and s > 0 else None
        detail = f"trained on version {h.base_version}: joins round {self.version + 1}" if reason else None
        v = Verdict(h.site, h.counter, h.msg_id, "buffered", reason, detail, self.version, s, acc.weight)
        self.store.add_buffered(
            BufferedRow(0, h.site, h.counter, h.msg_id, h.base_version, h.n_samples, s, acc.factor, acc.weight, ""),
            v,
            op.sealed,
            self.version,
            replaces=superseded,
        )
        self._decided(h.site, h.counter)
        if not self.buffer:
            self.buffer_since = time.monotonic()
        receipts: list[dict[str, Any]] = []
        if old is not None and superseded is not None:
            self.buffer.remove(old)
            self.metrics.decided("stale")
            receipts.append(superseded.receipt())
            if log.isEnabledFor(logging.INFO):
                event(log, "update.superseded", site=h.site, counter=old.counter, by=h.counter)
        self.buffer.append(acc)
        self.metrics.buffer_fill.set(len(self.buffer))
        self.metrics.decided("buffered")
        if log.isEnabledFor(logging.INFO):  # the fields are built only for a line that is written
            event(
                log,
                "update.buffered",
                site=h.site,
                counter=h.counter,
                staleness=s,
                weight=acc.weight,
                fill=len(self.buffer),
                of=self.strategy.arrivals,
            )
        return Decision(v.receipt(), receipts)

    def _stale(self, h: UpdateHeader, s: int, reason: str, detail: str) -> Decision:
        v = Verdict(h.site, h.counter, h.msg_id, "stale", reason, detail, self.version, s, 0.0)
        self.store.record(v)
        self._decided(h.site, h.counter)
        self.metrics.decided("stale")
        if log.isEnabledFor(logging.INFO):
            event(log, "update.stale", site=h.site, counter=h.counter, staleness=s, reason=reason)
        return Decision(v.receipt())

    def _base_model(self, version: int) -> State | None:
        """x_τ for FedAsync's mix: the live model, or a kept checkpoint (None once it was pruned)."""
        if version == self.version:
            return self.model
        ck = self.store.checkpoint(version)
        return envelope.decode_tensors(ck.weights) if ck is not None and ck.weights else None

    def _top_counter(self, site: str) -> int | None:
        """Highest counter decided for ``site`` (cached: decide() is the store's only writer)."""
        if site not in self._top:
            self._top[site] = self.store.max_counter(site)
        return self._top[site]

    def _decided(self, site: str, counter: int) -> None:
        top = self._top.get(site)
        if counter >= 0 and (top is None or counter > top):
            self._top[site] = counter

    def _refuse(
        self, site: str, counter: int, msg_id: str, reason: str, detail: str | None, store: bool = True
    ) -> Decision:
        v = Verdict(site, counter, msg_id, "rejected", reason, detail, self.version)
        if store:
            self.store.record(v)
            self._decided(site, counter)
        self.metrics.decided("rejected", reason)
        event(log, "update.rejected", level=logging.WARNING, site=site, counter=counter, reason=reason, detail=detail)
        return Decision(v.receipt())

    def _reduce(self, updates: list[Accepted], last_arrived: bool = True) -> Decision:
        result = self.strategy.reduce(self.model, updates, self.momentum)
        lineage = {
            "strategy": self.strategy.name,
            "reduce": self.strategy.reduce_stat,
            "parent": self.version,
            "updates": [dict(u.lineage(), clip_scale=c) for u, c in zip(updates, result.clip_scales)],
        }
        applied = [
            Verdict(u.site, u.counter, u.msg_id, "applied", None, None, self.version + 1, u.staleness, u.weight)
            for u in updates
        ]
        receipts = self.commit(result.model, result.momentum, lineage, applied, last_arrived)
        for u in updates:
            self.site_rate.applied(u.site)
        return Decision(receipts[-1], receipts[:-1], self.version)

    def commit(
        self,
        model: State,
        momentum: State | None,
        lineage: dict[str, Any],
        applied: list[Verdict],
        last_arrived: bool = True,
        keep_buffer: bool = False,
    ) -> list[dict[str, Any]]:
        """Make ``model`` version + 1 with its updates' ``applied`` verdicts; returns their receipts.

        The one path to a new version: the FedBuff buffer's reduce, a secure-aggregation cohort's sum, and
        a plant's adoption of a central model (``plant.core``: ``keep_buffer``, its lines' buffered updates
        wait for the next reduce).
        """
        new_version = self.version + 1
        step = None
        if self.cfg.publish.quantise == "int8" and not keep_buffer:  # a plant adopting central takes it exactly
            block, model = quantised.model_step(self.model, model)  # the model IS the sum of its int8 steps
            step = (new_version, self.version, block, model)
        self.store.commit_version(
            new_version,
            envelope.tensor_parts(model),  # written from the arrays, no joined copy
            envelope.tensor_parts(momentum) if momentum else None,
            lineage,
            applied,
            self.cfg.aggregator.keep_checkpoints,
            keep_verdicts=self.cfg.aggregator.keep_verdicts,
            keep_buffer=keep_buffer,
        )
        # committed: only now does the live state change
        self.model, self.momentum, self.version = model, momentum, new_version
        self._step = step  # before the snapshot: the publisher that reads one finds the other
        self.snapshot = self.served(new_version, model, lineage)  # one assignment: what the publisher thread reads
        if not keep_buffer:
            self.buffer = []
            self.buffer_since = None
        for v in applied:
            self._decided(v.site, v.counter)
        self.metrics.version.set(new_version)
        self.metrics.buffer_fill.set(len(self.buffer))
        for i, _ in enumerate(applied):
            # the others arrived as "buffered"; after a timeout, all of them did
            self.metrics.decided("applied", arrival=last_arrived and i == len(applied) - 1)
        event(log, "model.version", version=new_version, updates=len(applied), sites=sorted({v.site for v in applied}))
        return [v.receipt() for v in applied]

    def step_of(self, version: int, model: State) -> tuple[int, State] | None:
        """(parent version, int8 block) that made ``version`` when ``model`` is the model it made
        (``[publish] quantise = "int8"``); None otherwise (not quantised, or a version served from elsewhere)."""
        s = self._step
        return (s[1], s[2]) if s is not None and s[0] == version and s[3] is model else None

    def heard(self, header: Any) -> None:
        """An update's verified header, on either path (plain decide or a secure-aggregation submission).

        A hook for what a subclass keeps per site from headers (the plant: each line's reported ε); the
        central aggregator keeps nothing more than the verdicts.
        """

    @property
    def served_version(self) -> int:
        """The version sites are served and train on: a secure-aggregation cohort's base (a plant serves central)."""
        return self.snapshot[0]

    def served(self, version: int, model: State, lineage: dict[str, Any]) -> tuple[int, State]:
        """What the publisher publishes after a commit: the new version (a plant serves central ones only)."""
        return version, model

    def flush_due_in(self) -> float | None:
        """Seconds until the buffer times out (0: now), or None when nothing waits or there is no timeout."""
        timeout = self.cfg.strategy.buffer_timeout_s
        if timeout <= 0 or not self.buffer or self.buffer_since is None or not self._enough_sites():
            return None
        return max(0.0, self.buffer_since + timeout - time.monotonic())

    def flush(self) -> Decision | None:
        """Reduce the buffer as it is (fewer than K updates): the ``buffer_timeout_s`` path.

        Each buffered update gets its "applied" receipt, as when the K-th arrival flushes them.
        """
        if not self.buffer or not self._enough_sites():
            return None  # fewer than min_sites distinct sites: the buffer waits for more (issue 13)
        event(
            log,
            "buffer.timeout",
            fill=len(self.buffer),
            of=self.strategy.arrivals,
            sites=sorted({u.site for u in self.buffer}),
        )
        self.metrics.buffer_timeouts.inc()
        return self._reduce(list(self.buffer), last_arrived=False)

    def _enough_sites(self) -> bool:
        return len({u.site for u in self.buffer}) >= min(self.cfg.strategy.needed_sites, self.strategy.arrivals)

    # -- the enrollment, changed while running ---------------------------------------------
    def take_enrollment(self, new: Enrollment) -> Decision | None:
        """The enrollment now in force (sites revoked or enrolled while the aggregator runs); the version a buffer
        full under it makes, if it is.

        Why: K and the arrivals a buffer waits for (K + f under MDA) follow from the enrolled sites, and were sized
        once at start, so a buffer that awaited every enrolled site went on waiting for a revoked one until
        ``buffer_timeout_s`` (forever at the default 0). Now a revoked site's buffered update leaves the buffer
        (rejected, ``unenrolled``: a restart would find it unreadable, and no receipt can be sealed to the site), the
        strategy is sized for the sites left (:meth:`Strategy.resize`), and a buffer full under those sizes is
        reduced at once, as its last arrival would have reduced it. Never below ``min_sites``: with fewer sites
        enrolled the strategy stays sized for ``min_sites``, so no buffer fills and no version sums fewer (the
        start refuses such an enrollment, :func:`aggregator.fairness.check_federation`). The buffer never holds
        more than the new arrivals: at most one update per enrolled site, and the arrivals fall by at most one per
        revoked site from a count the buffer had not reached."""
        self.enrollment = new  # one reference assignment: open() in the pool threads sees old or new
        self._drop_unenrolled()
        n, floor = len(new.sites), self.cfg.strategy.min_sites
        if n < floor:
            event(log, "enrollment.below_min_sites", level=logging.ERROR, enrolled=n, min_sites=floor)
        before = self.strategy.reduce_stat
        self.strategy.resize(max(n, floor))
        if self.strategy.reduce_stat != before:
            self.metrics.reduce.labels(before).set(0)
            self.metrics.reduce.labels(self.strategy.reduce_stat).set(1)
        event(
            log,
            "aggregator.resized",
            enrolled=n,
            buffer_size=self.strategy.buffer_size,
            arrivals=self.strategy.arrivals,
            reduce=self.strategy.reduce_stat,
            buffered=len(self.buffer),
        )
        if self.buffer and len(self.buffer) >= self.strategy.arrivals and self._enough_sites():
            return self._reduce(list(self.buffer), last_arrived=False)
        return None

    def _drop_unenrolled(self) -> None:
        """Buffered updates of sites no longer enrolled leave the buffer, durably, with a final verdict."""
        gone = [u for u in self.buffer if u.site not in self.enrollment.sites]
        if not gone:
            return
        detail = "its site was revoked while the update waited in the buffer"
        self.store.unbuffer(
            [Verdict(u.site, u.counter, u.msg_id, "rejected", "unenrolled", detail, self.version) for u in gone]
        )
        for u in gone:
            self.buffer.remove(u)
            self.metrics.decided("rejected", "unenrolled")
            event(log, "update.unbuffered", level=logging.WARNING, site=u.site, counter=u.counter, reason="unenrolled")
        if not self.buffer:
            self.buffer_since = None
        self.metrics.buffer_fill.set(len(self.buffer))

    # -- conveniences ----------------------------------------------------------------------
    def process(self, sealed: bytes, topic_site: str | None = None, msg_id: str | None = None) -> Decision:
        return self.decide(self.open(sealed, topic_site, msg_id))

    def submit(self, sealed: bytes) -> dict[str, Any]:
        """One sealed update in, its receipt dict out (the in-process path for tests)."""
        return self.process(sealed).receipt

    def process_many(self, items: list[bytes]) -> list[Decision]:
        """Open in parallel, decide in order."""
        return list(self.process_stream(items))

    def sign_receipt(self, receipt: dict[str, Any], binary: bool = False, compact: bool = False) -> bytes | None:
        """The receipt signed and sealed to its site; None for a site not enrolled (nothing to seal to).
        ``binary``: FLR version 2, ``compact`` too: version 3, each for a site whose status says it reads it
        (``aggregator.service``)."""
        site = self.enrollment.sites.get(receipt["site"])
        return envelope.seal_receipt(receipt, self.keys, site.box_pub, binary, compact) if site is not None else None

    def lineage(self, version: int) -> dict[str, Any] | None:
        ck = self.store.checkpoint(version, blobs=False)
        return ck.lineage if ck else None

    def onnx(self, shared: State | None = None) -> bytes:
        """The ONNX of the global model: shared weights (default: current version), the seed's head (see
        :meth:`torch_model`). Written from the weights without torch where ``models.onnx_graph`` covers the
        model (the graph torch's exporter writes), else exported with torch."""
        weights = self.model if shared is None else shared
        seed = self._onnx_seed()
        if seed is None:
            from models import export_onnx

            return export_onnx(self.torch_model(weights), self.spec)
        from models.onnx_graph import build_onnx_over

        return build_onnx_over(self.spec, seed, weights)

    def onnx_needs_torch(self) -> bool:
        """Whether :meth:`onnx` exports with torch (a model ``models.onnx_graph`` does not write)."""
        return self._onnx_seed() is None

    def _onnx_seed(self) -> dict[str, Any] | None:
        """Version 0's parameters (personal ones included) when :meth:`onnx` writes the graph itself, else None."""
        if self._seed_params is False:
            from models import onnx_graph
            from models.seed_init import seed_params

            covered = onnx_graph.covers(self.spec)
            self._seed_params = seed_params(self.spec, self.cfg.aggregator.seed) if covered else None
        return self._seed_params

    def torch_model(self, shared: State | None = None) -> Any:
        """The global model as torch: shared weights (default: current version), the seed's head.

        The aggregator never sees personal parameters (a site's head), so the
        ONNX it publishes carries the head of version 0. Sites with a personal
        head combine the published body with their own head.
        """
        from models import build_model, load_shared_state

        if self._torch_model is None:
            self._torch_model = build_model(self.spec, seed=self.cfg.aggregator.seed)
        load_shared_state(self._torch_model, self.spec, self.model if shared is None else shared)
        return self._torch_model
