"""The edge agent's adopt task: follow the signed, sealed global model and take a new version into use.

Why a task of its own: a version is adopted only when its grant, manifest and every weight chunk are in,
signed by the aggregator and not too far a step from the model in use (``[adopt]``, ``models.step_bound``);
anything else is refused with a reason and the site keeps the model it has. Adopting saves the model (the last
good one comes back after a restart), with ``on_new_model`` wakes a round, and rebuilds the line's ONNX.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from broker_bridge.errors import ModelRefused, WireError
from edge.follow import ModelFollower
from edge.model_store import GlobalModel, check_global_model
from edge.site_state import SiteState
from fedline.logs import event

log = logging.getLogger("fedline.edge")


class Adopter:
    """Feeds the follower the model's messages; ``export`` rebuilds the line's ONNX after each adoption."""

    # How long a version announced by its int8 step may wait for the step's chunks before the site fetches
    # that version's full weights instead. Retained chunks arrive within a second of their manifest when the
    # broker has them, so this only bounds how long a lost step keeps a line on its old model.
    STEP_WAIT_S = 30.0

    def __init__(self, state: SiteState, export: Callable[[], Awaitable[Path | None]]) -> None:
        self.state = state
        self._export = export
        st = state
        self.follower = ModelFollower(  # the signed, sealed global model (edge.follow)
            st.keys,
            st.enrollment.aggregator.sign_pub,
            st.cfg.federation,
            st.spec,
            st.shared_names,
            st.shapes,
            # newer than ours, and not the version just refused as too far a step (when it is re-announced)
            lambda v: self.wants(v) and (st.model_refused or {}).get("version") != v,
            keyring=st.keyring,
            base=lambda: self.state.base,  # a version made by an int8 step from this one is made here
        )
        # following by full weights: the next version's weight topics are subscribed ahead (``_next``); False once
        # a version came by its int8 step (edge.follow_steps)
        self.weights_subscribed = True
        self._next: int | None = None  # the version whose weights are subscribed ahead
        self._fetching: set[int] = set()  # versions whose weights alone are subscribed (not the next one)
        # the int8 steps (``model/+/delta/#``), subscribed from the first manifest naming a step this site can
        # make: a federation that publishes none sends it nothing then, not even the clearing of each version's
        self.steps_subscribed = False
        self._step_wait: asyncio.Task[None] | None = None  # falls back to the weights if a step never completes

    def wants(self, version: int) -> bool:
        """Newer than ours; or the aggregator's own version 0 while we only have the one we built."""
        base = self.state.base
        return version > base.version or (version == base.version and not base.manifest)

    def restore_last_good(self) -> None:
        """Start from the last model adopted before a restart, checked again (a bad file is refused, not used)."""
        st = self.state
        blobs = st.store.load_global_blobs()
        if blobs is None:
            return
        try:
            st.base = self._check(*blobs)
            event(log, "model.restored", site=st.site, version=st.base.version)
        except ModelRefused as exc:
            event(
                log,
                "model.refused",
                logging.WARNING,
                site=st.site,
                source="disk",
                reason=exc.reason,
                detail=exc.detail,
            )

    def _check(self, manifest_blob: bytes, weights_blob: bytes) -> GlobalModel:
        st = self.state
        return check_global_model(
            manifest_blob,
            weights_blob,
            st.enrollment.aggregator.sign_pub,
            st.cfg.federation,
            st.spec,
            st.shared_names,
            st.shapes,
        )

    async def on_grant(self, blob: bytes) -> bool:
        """A federation key grant for this site; True when a key was taken (a manifest kept for it is tried)."""
        st = self.state
        if not blob:
            event(
                log,
                "fedkey.cleared",
                logging.WARNING,
                site=st.site,
                detail="the aggregator took this site's key grant back (revoked?)",
            )
            return False
        try:
            epoch = self.follower.on_grant(blob)
        except WireError as exc:
            st.metrics.malformed.labels("fedkey").inc()
            event(log, "fedkey.dropped", logging.WARNING, site=st.site, reason=str(exc))
            return False
        event(log, "fedkey.received", site=st.site, epoch=epoch)
        waiting = self.follower.take_waiting()
        if waiting is not None:
            await self.on_manifest(waiting)
        return True

    async def on_manifest(self, sealed: bytes) -> None:
        """A sealed manifest: the version to collect next (or a refusal, or a wait for its key)."""
        try:
            version = self.follower.on_manifest(sealed)
        except ModelRefused as exc:
            self._refuse(exc.version, f"{exc.reason}: {exc.detail}")
            return
        if version is None:  # not newer, or its grant has not arrived yet (kept for it)
            if self.follower.waiting_for_key:
                event(log, "model.waiting_for_key", logging.INFO, site=self.state.site)
            else:  # the version this site holds (e.g. after a restart): the next one's weights, ahead
                await self.watch_next()
            return
        chunks = self.follower.pending[2]["weights"]["chunks"] if self.follower.pending else None
        event(log, "model.announced", site=self.state.site, version=version, chunks=chunks)
        if self._step_wait is not None:
            self._step_wait.cancel()
        if self.follower.by_step:
            await self._subscribe_steps()
            self._step_wait = asyncio.create_task(self._wait_for_step(version))
        await self.try_adopt()

    async def _subscribe_steps(self) -> None:
        """Take every version's int8 step from now on (retained: this version's comes on subscribing)."""
        client = self.state.client
        if client is None or self.steps_subscribed:
            return
        self.steps_subscribed = True
        await client.subscribe(self.state.topics.deltas_filter(), qos=1)

    async def _wait_for_step(self, version: int) -> None:
        """After :attr:`STEP_WAIT_S`, fetch ``version``'s full weights if its step has not completed."""
        await asyncio.sleep(self.STEP_WAIT_S)
        if self.follower.give_up_step(version):
            event(
                log,
                "model.step_overdue",
                logging.WARNING,
                site=self.state.site,
                version=version,
                detail=f"its int8 step did not arrive in {self.STEP_WAIT_S:g} s; fetching the full weights",
            )
            await self.try_adopt()

    async def on_chunk(self, topic: str, version: int, index: int, payload: bytes, step: bool = False) -> None:
        """One weight chunk, or with ``step`` one chunk of a version's int8 step (a malformed one is counted and
        dropped); the version is adopted once complete."""
        try:
            (self.follower.on_step_chunk if step else self.follower.on_chunk)(version, index, payload)
        except WireError as exc:
            self.state.metrics.malformed.labels("weights").inc()
            event(log, "model.chunk_dropped", logging.WARNING, site=self.state.site, topic=topic, reason=str(exc))
            return
        await self.try_adopt()

    async def watch_next(self) -> None:
        """Following by full weights, subscribe to the next version's weights (and drop the fetched ones).

        Why not every version's (``model/+/weights/#``): the chunks are retained, so that wildcard brought every
        retained version's weights on each (re)connect, version 0 too, which a starting site builds itself
        from the seed (``edge.follow.ModelFollower.held``), and every clearing of an old version. The next
        version's topic is subscribed right after a version is adopted (or a manifest names the version this
        site holds), long before the next one can be published (it needs this site's round or others'); one
        published meanwhile is retained and comes on subscribing. A manifest of any other version (the first
        after connecting, or one after versions this site missed) fetches that version's weights alone
        (:meth:`_weights`): a joiner downloads the current version, not every retained one.
        """
        client = self.state.client
        if client is None:
            return
        if self.weights_subscribed and self.state.base.manifest.get("steps") is True:
            # the federation publishes int8 steps (its signed manifest says so, version 0's too): the next
            # version's step, not its full weights (fetched only if the step cannot be used, _weights)
            self.weights_subscribed = False
            await self._subscribe_steps()
            event(log, "model.follow", site=self.state.site, by="int8 steps")
        topics = self.state.topics
        want = self.state.base.version + 1 if self.weights_subscribed else None
        drop = [v for v in sorted(self._fetching) if v != want] + (
            [self._next] if self._next is not None and self._next != want else []
        )
        self._fetching -= set(drop)
        for v in drop:
            await client.unsubscribe(topics.weights_of(v))
        if want is not None and self._next != want:
            await client.subscribe(topics.weights_of(want), qos=1)
        self._next = want

    async def _weights(self, version: int | None) -> None:
        """Fetch ``version``'s full weights (one not subscribed ahead and not held), or with None stop taking
        weights at all: the federation publishes steps and this site makes them.

        Only that version's topics are subscribed (retained: its chunks come on subscribing), not every retained
        version's; they are dropped again once a version is adopted.
        """
        client = self.state.client
        if client is None:
            return
        topics = self.state.topics
        if version is None:
            following = self.weights_subscribed or self._next is not None
            self.weights_subscribed = False
            await self.watch_next()  # drops the next version's and the fetched versions' topics
            if following:
                event(log, "model.follow", site=self.state.site, by="int8 steps")
            return
        pending = self.follower.pending
        held = pending is not None and pending[0] == version and self.follower.held(version, pending[2]) is not None
        if version != self._next and version not in self._fetching and not held:
            self._fetching.add(version)
            await client.subscribe(topics.weights_of(version), qos=1)
            event(log, "model.follow", site=self.state.site, by="weights", version=version)

    async def try_adopt(self) -> None:
        """Adopt the announced version if it is complete, checked and not too far a step."""
        st = self.state
        pending = self.follower.pending
        if pending is not None and not self.follower.by_step:
            await self._weights(pending[0])
        by_step = self.follower.by_step
        try:
            g = self.follower.complete()
        except ModelRefused as exc:
            if exc.reason == "int8_step":  # not refused: the full weights of the same version are fetched
                event(log, "model.step_failed", logging.WARNING, site=st.site, version=exc.version, detail=exc.detail)
                if exc.version is not None:
                    await self._weights(exc.version)
                return
            self._refuse(exc.version, f"{exc.reason}: {exc.detail}")
            return
        if g is None:
            return
        if by_step:  # steps work here: no weight subscription left
            await self._weights(None)
        far = st.cfg.adopt.refusal(st.base.shared, g.shared, g.version - st.base.version)
        if far is not None:  # signed, yet too far from the model in use (models.step_bound)
            st.metrics.models_refused_step.inc()
            st.model_refused = {"version": g.version, "reason": "step"}
            self._refuse(g.version, far)
            await self.watch_next()  # the fetched version's topics go; the next one after ours stays
            return
        await self._adopt(g)

    async def _adopt(self, g: GlobalModel) -> None:
        st = self.state
        waiting = self._step_wait
        if waiting is not None and waiting is not asyncio.current_task():
            waiting.cancel()  # the version came; nothing is left to wait for
            self._step_wait = None
        st.base = g
        st.metrics.models_loaded.inc()
        event(log, "model.loaded", site=st.site, version=g.version)
        st.changed()
        # the round first: it starts (in its thread) while the rest is done, not after the subscription's two
        # round trips to the broker, the save and the line's ONNX; the next version waits on every site's round
        if st.cfg.training.on_new_model and g.version > 0:
            st.rebased = True
            st.wake_train.set()
        elif st.cohorts is not None and st.cohorts.ready(g.version) is not None:
            st.wake_train.set()  # a cohort was waiting for this base
        await self.watch_next()  # the next version needs rounds (one published meanwhile comes retained)
        try:
            await asyncio.to_thread(st.store.save_global, g)
        except OSError as exc:  # used now; after a restart the agent falls back to the last one saved
            event(log, "model.save_failed", logging.ERROR, site=st.site, version=g.version, error=str(exc))
        await self._export()

    def _refuse(self, version: int | None, reason: str) -> None:
        st = self.state
        st.metrics.models_refused.inc()
        event(
            log,
            "model.refused",
            logging.WARNING,
            site=st.site,
            version=version,
            reason=reason,
            keeping=st.base.version,
        )
        st.error(f"model {version} refused: {reason}")
