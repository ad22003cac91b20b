"""Handing the federation content key to the enrolled sites, and taking it back from revoked ones.

Each enrolled site gets the current epoch's key sealed to its own X25519 key,
retained on ``sites/<site>/fedkey`` (the ACL lets only that site and the
aggregator read it). When the enrollment file changes, the new one is taken
(updates of a deleted site are refused as ``unenrolled`` from then on); a
deleted site starts a new epoch (``aggregator.epochs``), its retained grant
is cleared, and every remaining site gets the new key. The strategy is sized for
the sites left (``AggregatorCore.take_enrollment``): a buffer that awaited a
revoked site is reduced when it is full without it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from aggregator.epochs import Epoch, FederationKeys
from broker_bridge.errors import FedlineError
from broker_bridge.federation_key import seal_grant
from broker_bridge.keys import Enrollment
from broker_bridge.topics import Topics
from fedline.logs import event

log = logging.getLogger("fedline.aggregator.grants")


def _stamp(path: str) -> tuple[float, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def fingerprints(enrollment: Enrollment) -> dict[str, str]:
    """Each enrolled site's public keys as one hex string: a change is a key rotation (a new epoch)."""
    return {s: (p.sign_pub + p.box_pub).hex() for s, p in enrollment.sites.items()}


class Granter:
    """The key epoch of one aggregator, kept in step with its enrollment file."""

    def __init__(self, core: Any, topics: Topics) -> None:
        self.core = core
        self.topics = topics
        self.path = core.cfg.aggregator.enrollment_file
        self._stamp = _stamp(self.path)
        self.keys = FederationKeys(core.store)
        self.epoch: Epoch
        self.epoch, revoked = self.keys.sync(set(core.enrollment.sites), fingerprints(core.enrollment))
        self._to_clear: set[str] = set(revoked)
        self.flushed: Any = None  # the Decision of a buffer the last reload found full (AggregatorCore.take_enrollment)

    def reload_if_changed(self) -> bool:
        """Take a changed enrollment file (runs in the aggregator's serial thread); True if taken."""
        stamp = _stamp(self.path)
        if stamp == self._stamp or stamp is None:
            return False
        self._stamp = stamp
        old = self.core.enrollment
        try:
            new = Enrollment.load(self.path)
            if new.federation != old.federation or new.aggregator.sign_pub != old.aggregator.sign_pub:
                raise FedlineError("the new file names another federation or aggregator key")
        except FedlineError as exc:  # half-written or wrong: keep serving with the old one
            event(log, "enrollment.refused", level=logging.ERROR, file=self.path, error=str(exc))
            return False
        # the new epoch first: a version the resize below makes is published under it, never to a revoked site
        self.epoch, revoked = self.keys.sync(set(new.sites), fingerprints(new))
        self._to_clear |= revoked
        # the strategy sized for the sites left: a buffer full under it makes its version now (the service sends it)
        try:
            self.flushed = self.core.take_enrollment(new)
        except Exception as exc:  # e.g. a full disk at the reduce: the watcher goes on, the buffer waits as it is
            event(log, "enrollment.resize_failed", level=logging.ERROR, error=repr(exc))
        event(log, "enrollment.reloaded", sites=len(new.sites), epoch=self.epoch.number, revoked=sorted(revoked))
        return True

    async def publish_grant(self, client: Any, site: str) -> None:
        """One enrolled site's grant of the current epoch (retained); nothing for a site not enrolled."""
        pub = self.core.enrollment.sites.get(site)
        if pub is None:
            return
        blob = seal_grant(self.topics.federation, pub, self.epoch.number, self.epoch.key, self.core.keys)
        try:
            await client.publish(self.topics.fedkey(site), blob, qos=1, retain=True)
        except FedlineError as exc:  # re-sent on the next connect, enrollment change or catch-up
            event(log, "fedkey.unsent", level=logging.WARNING, site=site, error=str(exc))

    async def publish_grants(self, client: Any) -> None:
        """Every enrolled site's grant (retained), and an empty retained payload where a revoked one was."""
        epoch, core = self.epoch, self.core
        for site in sorted(core.enrollment.sites):
            await self.publish_grant(client, site)
        for site in sorted(self._to_clear):
            try:
                await client.publish(self.topics.fedkey(site), b"", qos=1, retain=True)
                self._to_clear.discard(site)
            except FedlineError as exc:
                event(log, "fedkey.uncleared", level=logging.WARNING, site=site, error=str(exc))
        event(log, "fedkey.granted", epoch=epoch.number, sites=len(core.enrollment.sites))


async def clear_retained(client: Any, topic: str, site: str, metrics: Any) -> None:
    """Clear a retained message on an update topic, count it and log it (it is processed as usual)."""
    metrics.retained_cleared.labels(site).inc()
    event(log, "update.retained_cleared", level=logging.WARNING, site=site, topic=topic)
    try:
        await client.publish(topic, b"", qos=1, retain=True)
    except FedlineError as exc:  # cleared at the next delivery of the retained copy
        event(log, "update.retained_not_cleared", level=logging.WARNING, site=site, error=str(exc))
