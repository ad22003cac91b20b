"""The line's model loader: offered versions built, probed and canary-checked off the loop, swapped on it.

Why a worker thread and then one assignment: building an ONNX Runtime session and the canary take long enough
to delay rows, so they run in a thread; the swap itself is one reference assignment on the loop, between two
batches (``edge.inference.scoring``). The loader also keeps what must survive a restart (the model in service,
the previous good one, the versions rolled back from: ``edge.inference.state``), restores it at start without
waiting for the broker, and rolls back on request. A model that fails anything is refused and never tried
again; the one in service keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from broker_bridge.envelope import content_hash
from broker_bridge.errors import ModelRefused
from edge.inference.config import InferConfig
from edge.inference.outputs import Metrics
from edge.inference.session import LoadedModel, ModelInfo, build_model, canary_check
from edge.inference.state import SavedModel, Serving, StateDir
from edge.inference.stats import ServiceStats, Swap
from fedline.logs import event

log = logging.getLogger("fedline.infer")


@dataclass(frozen=True)
class Candidate:
    """A new version offered by a watcher, not yet built."""

    info: ModelInfo
    blob: bytes


@dataclass(frozen=True)
class LoaderHooks:
    """What the loader asks of the rest of the service: where the scorer is, its canary rows, and whom to tell."""

    first_seq: Callable[[], int]  # the seq of the next row the scorer will score
    canary_rows: Callable[[], tuple[np.ndarray | None, np.ndarray | None]]
    on_swap: Callable[[int], None]  # a version now serves (the federation's liveness status)
    on_refused_step: Callable[[dict[str, Any]], None]  # a version refused as too far a step (public status)


class Loader:
    """Holds the model in service (``current``) and the previous good one; ``ready`` once one serves."""

    def __init__(
        self,
        cfg: InferConfig,
        row_shape: tuple[int, ...],
        task: str,
        canary_on: bool,
        state: StateDir,
        stats: ServiceStats,
        metrics: Metrics,
        hooks: LoaderHooks,
    ) -> None:
        self.cfg, self.row_shape, self.task, self.canary_on = cfg, row_shape, task, canary_on
        self.origin = cfg.line.model_source
        self.state, self.stats, self.metrics, self.hooks = state, stats, metrics, hooks
        self.current: LoadedModel | None = None
        self.previous: LoadedModel | None = None
        self.blocked_version = -1
        self.ready = asyncio.Event()
        self._candidates: asyncio.Queue[Candidate] = asyncio.Queue()
        self._failed: set[tuple[int, str]] = set()  # refused or rolled back from: never tried again
        self._blocked: list[tuple[int, str]] = []  # rolled back from (persisted)
        self._save_lock = threading.Lock()  # one save of the serving state at a time (:meth:`persist`)
        self._asked = 0  # persists asked for, in the order of the states they save
        self._saved = 0  # the newest of them on disk

    # ------------------------------------------------------------------ versions
    def current_version(self) -> int:
        """Newest version this line has served or refused by rollback (watchers offer only newer)."""
        v = self.current.version if self.current is not None and self.current.info.origin == self.origin else -1
        return max(v, self.blocked_version)

    def is_new(self, version: int, blob_hash: str) -> bool:
        """Whether an offered model should be tried.

        From the manifest, only a newer global version. From the model
        directory also the same version with another hash: the edge agent
        re-exports after each local round (same global body, retrained
        personal head). Never a model refused, nor the bytes of one rolled back from.
        """
        if (version, blob_hash) in self._failed or any(h == blob_hash for _, h in self._blocked):
            return False
        if self.current is not None and self.current.info.hash == blob_hash:
            return False
        if self.origin == "model_dir":
            return version >= self.current_version()
        return version > self.current_version()

    def refuse(self, reason: str, detail: str, version: int | None) -> None:
        """Count and log one refused model or model message; the old model keeps serving."""
        self.stats.refused[reason] += 1
        self.metrics.refused.labels(reason=reason).inc()
        event(
            log,
            "model.refused",
            level=logging.WARNING,
            reason=reason,
            version=version,
            serving=self.current.version if self.current else None,
            detail=detail,
        )

    def offer(self, info: ModelInfo, blob: bytes) -> None:
        """Hand a new version to the loader (watchers call this)."""
        self._candidates.put_nowait(Candidate(info, blob))

    # ------------------------------------------------------------------ swapping
    def swap(self, new: LoadedModel, kind: str, previous: LoadedModel | None) -> Swap:
        """Put ``new`` in service. Runs on the loop between batches: one reference assignment."""
        old = self.current
        self.current, self.previous = new, previous
        seconds = time.monotonic() - new.info.seen_at if kind == "reload" and new.info.seen_at else 0.0
        swap = Swap(new.version, old.version if old else None, self.hooks.first_seq(), seconds, kind)
        self.stats.swaps.append(swap)
        self.metrics.swaps.inc()
        self.metrics.version.set(new.version)
        self._served(new.info.meta.get("served"))
        self.hooks.on_swap(new.version)
        if kind == "reload":
            self.metrics.swap_seconds.set(seconds)
        self.ready.set()
        event(
            log,
            "model.swapped",
            kind=kind,
            version=new.version,
            previous=swap.previous,
            first_seq=swap.first_seq,
            swap_ms=round(seconds * 1000, 2),
            origin=new.info.origin,
            served=(self.stats.served or {}).get("kind"),
            validation_metric=(self.stats.served or {}).get("validation_metric"),
        )
        return swap

    def _served(self, served: Any) -> None:
        """The line's status: which candidate its site picked and that candidate's validation metric."""
        self.metrics.served.clear()
        if not isinstance(served, dict) or not isinstance(served.get("kind"), str):
            self.stats.served = None
            return
        self.stats.served = {
            "kind": served["kind"],
            "metric": served.get("metric"),
            "validation_metric": served.get("validation_metric"),
            "reason": served.get("reason"),
            # a blend (edge/blend.py): the local-only model's share w and the federation model it is blended with
            "weight": served.get("weight"),
            "blend_of": served.get("blend_of"),
        }
        v = served.get("validation_metric")
        if isinstance(v, (int, float)):
            self.metrics.served.labels(kind=served["kind"], metric=str(served.get("metric"))).set(float(v))

    # ------------------------------------------------------------------ state across restarts
    async def persist(self) -> None:
        """Save the models in service and the versions rolled back from (``edge.inference.state``).

        Why the state is taken here, on the loop, and saved under a lock with its order number: saves run in
        worker threads, and two of them (a rollback's, then the next version's swap; or a swap's save that a
        shutdown cancelled while its thread went on) could otherwise finish in either order. An older state
        finishing last would name the older model in ``serving.json`` and delete the newer one's file, so a
        restart would serve the wrong version. A save whose state is older than one already on disk is skipped.
        """
        self._asked += 1
        state = (self._asked, self.current, self.previous, self.blocked_version, tuple(self._blocked))
        await asyncio.to_thread(self._save, *state)

    def _save(
        self,
        order: int,
        current: LoadedModel | None,
        previous: LoadedModel | None,
        blocked_version: int,
        blocked: tuple[tuple[int, str], ...],
    ) -> None:
        """Write one state (worker thread): skipped when a newer one is on disk already."""

        def saved(m: LoadedModel | None) -> SavedModel | None:
            if m is None:
                return None
            return self.state.save_model(m.version, m.info.hash, m.blob, m.info.origin)

        with self._save_lock:
            if order < self._saved:
                return
            self.state.save(Serving(saved(current), saved(previous), blocked_version, blocked))
            self._saved = order

    async def restore(self) -> None:
        """Serve the model saved in the state dir at once (a restart must not wait for the broker)."""
        serving = self.state.load()
        self.blocked_version = serving.blocked_version
        self._blocked = list(serving.blocked)
        self._failed.update(serving.blocked)
        cur, prev = [await self._restore_one(saved) for saved in (serving.current, serving.previous)]
        if cur is None and prev is not None:
            cur, prev = prev, None
        if cur is not None:
            self.swap(cur, "restore", prev)
        if self.state.rollback_requested():
            await self.rollback("request file at start")

    async def _restore_one(self, saved: SavedModel | None) -> LoadedModel | None:
        """One saved model, rebuilt if it is from this line's model source and its bytes are intact."""
        if saved is None or saved.origin != self.origin:
            return None
        blob = self.state.read_model(saved)
        if blob is None or content_hash(blob) != saved.hash:
            return None
        info = ModelInfo(saved.version, saved.hash, saved.origin, {"restored": True})
        try:
            return await asyncio.to_thread(build_model, blob, info, self.row_shape, threads=self.cfg.line.threads)
        except ModelRefused as exc:
            self.refuse(exc.reason, f"saved model: {exc.detail}", saved.version)
            return None

    async def rollback(self, why: str) -> bool:
        """Put the previous good version back in service; refuse the current one from now on."""
        self.state.clear_rollback_request()
        if self.previous is None or self.current is None:
            event(
                log,
                "rollback.unavailable",
                level=logging.WARNING,
                why=why,
                serving=self.current.version if self.current else None,
            )
            return False
        bad = self.current
        self.blocked_version = max(self.blocked_version, bad.version)
        self._failed.add((bad.version, bad.info.hash))
        self._blocked.append((bad.version, bad.info.hash))
        self.swap(self.previous, "rollback", None)
        event(
            log, "rollback.done", why=why, version=self.current.version if self.current else None, blocked=bad.version
        )
        await self.persist()
        return True

    async def rollback_poll(self) -> None:
        """Roll back when ``fedline infer --rollback`` leaves its request file."""
        while True:
            await asyncio.sleep(self.cfg.line.poll_s)
            if self.state.rollback_requested():
                await self.rollback("request file")

    # ------------------------------------------------------------------ loading
    async def loop(self) -> None:
        """Take offered versions one at a time (newest wins), prepare off the loop, swap on it."""
        while True:
            cand = await self._newest_candidate()
            if not self.is_new(cand.info.version, cand.info.hash):
                continue
            new = await self._try_prepare(cand)
            if new is None or not self.is_new(cand.info.version, cand.info.hash):
                continue  # refused, or a rollback blocked it meanwhile
            self.swap(new, "reload", self.current if self.current is not None else None)
            await self.persist()

    async def _newest_candidate(self) -> Candidate:
        """The next offer; a newer one already waiting supersedes it."""
        cand = await self._candidates.get()
        while not self._candidates.empty():  # a newer offer supersedes one not yet started
            newer = self._candidates.get_nowait()
            if newer.info.version >= cand.info.version:
                event(log, "model.superseded", version=cand.info.version, by=newer.info.version)
                cand = newer
        return cand

    async def _try_prepare(self, cand: Candidate) -> LoadedModel | None:
        """The candidate built and checked in a worker thread; None when refused (never tried again)."""
        recent, labels = self.hooks.canary_rows()
        try:
            return await asyncio.to_thread(self._prepare, cand, self.current, recent, labels)
        except ModelRefused as exc:
            self._failed.add((cand.info.version, cand.info.hash))
            self.refuse(exc.reason, exc.detail, cand.info.version)
            if exc.reason == "step":  # public in the line's status, like a site's (models.step_bound)
                self.hooks.on_refused_step({"version": cand.info.version, "reason": "step"})
        except Exception as exc:  # anything unforeseen refuses the model, never the service
            self._failed.add((cand.info.version, cand.info.hash))
            self.refuse("probe", f"version {cand.info.version}: {type(exc).__name__}: {exc}", cand.info.version)
        return None

    def _prepare(
        self, cand: Candidate, old: LoadedModel | None, recent: np.ndarray | None, labels: np.ndarray | None
    ) -> LoadedModel:
        """Worker thread: build, probe and (when possible) canary-check a candidate."""
        new = build_model(cand.blob, cand.info, self.row_shape, threads=self.cfg.line.threads, recent=recent)
        if self.origin == "manifest" and old is not None and old.info.origin == "manifest":
            from edge.inference.onnx_params import check_step  # (onnx parses the model once more)

            check_step(self.cfg.line.adopt, old.blob, old.version, cand.blob, cand.info.version)
        canary = self.cfg.line.canary
        if not self.canary_on or old is None:
            return new
        n = 0 if labels is None else len(labels)
        if n < canary.min_rows:
            event(log, "canary.skipped", version=new.version, labelled_rows=n, min_rows=canary.min_rows)
            return new
        assert recent is not None and labels is not None
        result = canary_check(new, old, recent, labels, self.task, canary.margin)
        event(
            log,
            "canary.passed",
            version=new.version,
            rows=result.rows,
            old_loss=round(result.old_loss, 5),
            new_loss=round(result.new_loss, 5),
            against=old.version,
        )
        return new
