"""The edge's part in secure aggregation: join cohorts, mask one update per cohort, ack, answer.

Used when the site's config says ``secure_aggregation = true``. The agent trains only for a
cohort it joined, on the cohort's base version; its clipped, DP-noised delta is L2-clipped to the
cohort's range (post-processing: epsilon is unchanged), quantised and masked by
:class:`broker_bridge.secagg.member.SecAggMember`, and leaves as an ordinary sealed update through
the outbox (so it survives restarts and outages). Acks and answers go straight to the broker:
they are small, and a member that is away when they are asked for is a dropout the protocol
tolerates. Every answer is recorded in ``<data_dir>/secagg.sqlite`` before it leaves.

Announcements arrive sealed under the federation content key and requests sealed to this site
(see :mod:`broker_bridge.secagg.messages`). Retained messages come in any order, so an
announcement of an epoch whose grant has not arrived yet is kept and handled when it does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from broker_bridge.envelope import UpdateHeader, seal_update
from broker_bridge.errors import SecAggError, WireError
from broker_bridge.federation_key import open_notice
from broker_bridge.keys import Enrollment, KeyPair
from broker_bridge.secagg import messages as m
from broker_bridge.secagg.member import SecAggMember
from broker_bridge.secagg.vector import flatten
from broker_bridge.topics import Topics
from fedline.logs import event

log = logging.getLogger("fedline.edge")


class EdgeCohorts:
    """One site's cohort membership, backed by its on-disk answer log."""

    def __init__(
        self, keys: KeyPair, enrollment: Enrollment, topics: Topics, data_dir: Path, keyring: Mapping[int, bytes]
    ) -> None:
        self.keys = keys
        self.enrollment = enrollment
        self.topics = topics
        self.keyring = keyring  # the site's content keys by epoch (shared with the agent, filled by its grants)
        self.member = SecAggMember(keys, enrollment, data_dir / "secagg.sqlite")
        self.pending: m.CohortAnnouncement | None = None  # joined, not yet masked in
        self.waiting: dict[tuple[str, str | None], bytes] = {}  # (kind, cohort) -> sealed, its epoch not granted yet

    def close(self) -> None:
        self.member.close()

    def _refused(self, name: str, exc: SecAggError) -> None:
        event(log, name, logging.WARNING, site=self.keys.ident, reason=exc.reason, detail=exc.detail)

    def _unseal(self, kind: str, payload: bytes, cohort: str | None) -> bytes | None:
        """The signed announcement inside; None when it must wait for its epoch's grant or is refused."""
        try:
            return open_notice(payload, self.keyring, kind.replace("_", " "))
        except WireError as exc:
            if exc.reason == "epoch":  # its grant may be the next message: try again then
                self.waiting[(kind, cohort)] = bytes(payload)
            else:
                self._refused(f"{kind.replace('_', '.')}_refused", SecAggError("schema", str(exc)))
            return None

    def take_waiting(self) -> list[tuple[str, bytes, str | None]]:
        """The announcements kept for a grant, as ``(kind, payload, cohort)``, now that one arrived."""
        out = [(kind, payload, cohort) for (kind, cohort), payload in self.waiting.items()]
        self.waiting.clear()
        return out

    def subscriptions(self) -> list[str]:
        return [self.topics.secagg_filter(), self.topics.secagg_request(self.keys.ident)]

    def route(self, kind: str, payload: bytes, cohort: str | None = None) -> tuple[bool, bytes | None]:
        """One ``secagg_*`` message (``cohort``: the id in its topic) as ``(joined, reply)``.

        ``joined``: this member joined a cohort, a reason to train (a line) or to submit (a plant);
        ``reply``: the sealed ack or answer to publish on the member's reply topic, if any.
        """
        if kind == "secagg_cohort":
            return self.on_cohort(payload, cohort), None
        if kind == "secagg_survivors":
            return False, self.on_survivors(payload, cohort)
        if kind == "secagg_request":
            return False, self.on_request(payload)
        return False, None

    def on_cohort(self, payload: bytes, cohort: str | None = None) -> bool:
        """A cohort announcement (``cohort``: the id in its topic); True when this site joined it (then train)."""
        if not payload:  # a cleared announcement: the cohort ended (or died with an aggregator restart)
            if self.pending is not None and self.pending.cohort == cohort:
                self.pending = None  # no round for it: the update would only be refused
            self.waiting.pop(("secagg_cohort", cohort), None)
            return False
        signed = self._unseal("secagg_cohort", payload, cohort)
        if signed is None:
            return False
        try:
            self.pending = self.member.accept_cohort(signed)
        except SecAggError as exc:
            if exc.reason == "replay":  # the retained announcement again, e.g. after our restart
                return self._resume(signed)
            if exc.reason != "not_member":
                self._refused("secagg.cohort_refused", exc)
            return False
        event(
            log,
            "secagg.joined",
            site=self.keys.ident,
            cohort=self.pending.cohort,
            base_version=self.pending.base_version,
            members=len(self.pending.members),
        )
        return True

    def _resume(self, signed: bytes) -> bool:
        """A cohort joined before a restart and not yet masked in: still ours until its deadline."""
        ann, _ = m.open_cohort(signed, self.enrollment.aggregator.sign_pub, self.enrollment.federation)
        row = self.member.log.announcement(ann.cohort)
        if row is None or row[2] != "joined" or ann.deadline <= time.time():
            return False
        self.pending = ann
        return True

    def ready(self, base_version: int) -> m.CohortAnnouncement | None:
        """The cohort to train for now: joined, before its deadline, on the base this site holds."""
        ann = self.pending
        if ann is None or ann.deadline <= time.time():
            self.pending = None
            return None
        return ann if ann.base_version == base_version else None

    def seal(self, header: UpdateHeader, delta: Mapping[str, np.ndarray]) -> bytes:
        """Mask the delta into the pending cohort (once: recorded first) and seal it like any update."""
        ann = self.pending
        if ann is None or header.base_version != ann.base_version:
            raise SecAggError("state", "no cohort to mask into on this base version")
        vec = flatten(delta)
        norm = float(np.linalg.norm(vec))
        if norm > ann.clip_range:  # the per-site bound: post-processing of the DP delta
            vec *= ann.clip_range / norm
        self.pending = None
        sub = self.member.mask(ann.cohort, vec)
        return seal_update(
            header,
            {"secagg": np.frombuffer(sub.encode(), dtype=np.uint8)},
            self.keys,
            self.enrollment.aggregator.box_pub,
        )

    def on_survivors(self, payload: bytes, cohort: str | None = None) -> bytes | None:
        """The survivors announcement of a cohort we joined: our ack, sealed (None: not ours)."""
        if not payload:
            self.waiting.pop(("secagg_survivors", cohort), None)
            return None
        signed = self._unseal("secagg_survivors", payload, cohort)
        if signed is None:
            return None
        try:
            doc, _ = m.open_survivors(signed, self.enrollment.aggregator.sign_pub)
            if self.member.log.announcement(doc.cohort) is None:
                return None
            sig = self.member.ack(signed)
        except SecAggError as exc:
            self._refused("secagg.survivors_refused", exc)
            return None
        return m.seal_reply("ack", doc.cohort, sig, self.keys, self.enrollment.aggregator.box_pub)

    def on_request(self, payload: bytes) -> bytes | None:
        """An unmask request: our answer, sealed (None when refused)."""
        try:
            answer = self.member.answer(m.UnmaskRequest.open(payload, self.keys))
        except SecAggError as exc:
            self._refused("secagg.request_refused", exc)
            return None
        if answer.refused:
            event(log, "secagg.bundles_refused", logging.WARNING, site=self.keys.ident, refused=dict(answer.refused))
        event(log, "secagg.answered", site=self.keys.ident, cohort=answer.cohort, dealers=len(answer.self_shares))
        return m.seal_reply("answer", answer.cohort, answer.encode(), self.keys, self.enrollment.aggregator.box_pub)
