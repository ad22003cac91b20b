"""Secure-aggregation cohorts at the aggregator: a FedBuff buffer becomes a cohort.

Life of a cohort (protocol: docs/architecture.md, "Secure aggregation"):

1. **form** — when at least ``[strategy] min_sites`` enrolled sites are online (their retained
   status says so; the last will says when they are not) and in no open cohort, and either all
   such sites are free or the first has waited ``gather_s``: sign and publish (retained) the
   cohort announcement on the current version. Every member's weight is 1: the cohort applies
   FedBuff's (1/K) sum f(s) delta_i with K = the survivors, and one staleness for all of them.
2. **collect** — each member's masked update arrives as a normal sealed update; it is held (receipt
   ``buffered``) until every member submitted, every member yet to submit went offline, or the
   deadline passed.
3. **unmask** — sign and publish the survivors; relay unmask requests to members once t of them
   acknowledged it; check answers; with every secret reconstructable, remove the masks.
4. **apply** — reject a cohort whose sum exceeds K x the per-site ``norm_bound``; else step the
   model by ``server_lr * f(s) * sum / K`` (s = versions since the cohort's base) and send
   ``applied`` receipts. A cohort that cannot complete fails cleanly: ``rejected`` receipts
   (``secagg_cohort_failed``) to the members who submitted.

Open cohorts live in memory, so an aggregator restart (kill -9 included) fails them cleanly rather
than resuming: the ids of open cohorts are in the store (meta ``secagg_open``, written before an
announcement leaves), and every masked update held for them has a ``buffered`` verdict there (a
cohort's sum is committed with its ``applied`` verdicts in one transaction, so a ``buffered`` one
left after a restart was never applied). On start, each such update gets its ``rejected``
(``secagg_cohort_failed``) receipt and the dead cohorts' retained announcements are cleared; the
members' next rounds go to the next cohort. Resuming would need the masked vectors and the shares
already answered kept on disk; failing costs one round. Every method runs on the aggregator's
serial decision thread.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aggregator.core import AggregatorCore, Opened
from aggregator.store import Verdict
from broker_bridge.binhead import read_status
from broker_bridge.errors import SecAggError
from broker_bridge.federation_key import seal_notice
from broker_bridge.secagg import messages as m
from broker_bridge.secagg.unmask import CohortUnmasker
from broker_bridge.secagg.vector import unflatten
from broker_bridge.topics import Topics
from fedline.logs import event

log = logging.getLogger("fedline.aggregator")
_OPEN_KEY = "secagg_open"  # meta: JSON list of the cohort ids announced and not yet ended


@dataclass(frozen=True)
class Outgoing:
    """One MQTT publish the service must make."""

    topic: str
    payload: bytes
    retain: bool = False


@dataclass
class _Cohort:
    unmasker: CohortUnmasker
    held: dict[str, tuple[int, str, int]] = field(default_factory=dict)  # site -> (counter, msg_id, n_samples)
    closed_at: float | None = None
    requested: set[str] = field(default_factory=set)

    @property
    def ann(self) -> m.CohortAnnouncement:
        return self.unmasker.ann


class CohortCoordinator:
    """Forms cohorts from online sites and turns each into one model version (or a clean failure)."""

    def __init__(
        self,
        core: AggregatorCore,
        topics: Topics,
        content_key: Callable[[], tuple[int, bytes]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.core = core
        self.topics = topics
        self.content_key = content_key  # (epoch, key) now: announcements are sealed for members only
        self.cfg = core.cfg.secagg
        self.clock = clock
        self.online: dict[str, float] = {}  # site -> since when
        self.cohorts: dict[str, _Cohort] = {}
        self.size = sum(math.prod(s) for s in core.reference.values())
        self.stats: dict[str, Any] = {
            "cohorts": 0,
            "cohorts_failed": int(core.store.get_meta("secagg_cohorts_failed") or 0),
            "dropouts_recovered": 0,
            "min_cohort_sites": None,
            "refused": {},
        }
        self._recovered = self._fail_left_open()  # published by the first tick

    # ------------------------------------------------------------------ after a restart
    def _fail_left_open(self) -> list[Outgoing]:
        """Fail the cohorts a previous run left open: receipts for their held updates, announcements cleared."""
        store = self.core.store
        left = json.loads(store.get_meta(_OPEN_KEY) or "[]")
        # a cohort committed just before the crash (its sum is a version) was not open any more
        top = self.core.version
        recent = (self.core.lineage(x) or {} for x in range(max(1, top - len(left) + 1), top + 1))
        committed = {lin.get("cohort") for lin in recent}
        left = [c for c in left if c not in committed]
        in_plain_buffer = {(r.site, r.counter) for r, _ in store.buffered()}  # not cohort submissions
        held = [v for v in store.verdicts() if v.verdict == "buffered" and (v.site, v.counter) not in in_plain_buffer]
        if not left and not held:
            return []
        detail = "the aggregator restarted while this update's cohort was open; the next cohort takes a new update"
        out: list[Outgoing] = []
        for old in held:
            v = Verdict(
                old.site, old.counter, old.msg_id, "rejected", "secagg_cohort_failed", detail, self.core.version
            )
            store.record(v)
            self.core.metrics.decided("rejected", "secagg_cohort_failed")
            out += self._receipt(v.receipt())
        for cohort in left:
            out += [
                Outgoing(self.topics.secagg_cohort(cohort), b"", retain=True),
                Outgoing(self.topics.secagg_survivors(cohort), b"", retain=True),
            ]
        self.stats["cohorts_failed"] += len(left)
        store.set_meta("secagg_cohorts_failed", str(self.stats["cohorts_failed"]))
        store.set_meta(_OPEN_KEY, "[]")
        event(
            log,
            "secagg.cohorts_failed_on_restart",
            level=logging.WARNING,
            cohorts=left,
            rejected=[f"{v.site}#{v.counter}" for v in held],
        )
        return out

    def _save_open(self) -> None:
        self.core.store.set_meta(_OPEN_KEY, json.dumps(sorted(self.cohorts)))

    def _count_refusal(self, reason: str) -> None:
        self.stats["refused"][reason] = self.stats["refused"].get(reason, 0) + 1

    # ------------------------------------------------------------------ who is online
    def on_status(self, site: str, payload: bytes) -> None:
        """A site's retained status (or its last will): online sites may join a cohort."""
        if site not in self.core.enrollment.sites:
            return
        doc = read_status(payload) if payload else None
        state = doc.get("state") if doc is not None else "offline"
        if state == "online":
            self.online.setdefault(site, self.clock())
        else:
            self.online.pop(site, None)

    def _busy(self) -> set[str]:
        return {s for c in self.cohorts.values() for s in c.ann.members}

    # ------------------------------------------------------------------ the clock
    def tick(self) -> list[Outgoing]:
        """Form a cohort if one can be formed; close cohorts past their deadline; fail stuck ones."""
        now = self.clock()
        out, self._recovered = self._recovered, []
        out += self._supersede()
        out += self._form(now)
        for c in list(self.cohorts.values()):
            if c.closed_at is None:
                waiting = [x for x in c.ann.members if x not in c.unmasker.submissions]
                # every member yet to submit is offline (status or last will): the deadline would add nothing
                if not any(x in self.online for x in waiting) or now >= c.ann.deadline:
                    out += self._close(c, now)
            elif now >= c.closed_at + self.cfg.unmask_timeout_s:
                out += self._fail(
                    c,
                    f"no unmasking within {self.cfg.unmask_timeout_s} s: "
                    f"{len(c.unmasker.missing())} secrets lack {c.ann.threshold} shares",
                )
        return out

    def _supersede(self) -> list[Outgoing]:
        """End open cohorts nobody has masked into yet whose base is no longer the served version.

        Their members follow the served model, so once a newer one is served (a plant adopts a central
        version between its cohorts; concurrent cohorts, one of which finished) none of them can train for
        the old base: ending the cohort now frees them for one on the new base, rather than at the deadline.
        Nothing was submitted, so there is nothing to refuse or unmask.
        """
        served, out = self.core.served_version, []
        for c in list(self.cohorts.values()):
            if c.closed_at is None and not c.held and c.ann.base_version < served:
                event(
                    log, "secagg.cohort_superseded", cohort=c.ann.cohort, base_version=c.ann.base_version, served=served
                )
                out += self._end(c)
        return out

    def _form(self, now: float) -> list[Outgoing]:
        busy = self._busy()
        free = sorted(s for s in self.online if s not in busy)
        if len(free) < self.core.cfg.strategy.min_sites:
            return []
        idle = [s for s in self.core.enrollment.sites if s not in busy]
        if len(free) < len(idle) and now - min(self.online[s] for s in free) < self.cfg.gather_s:
            return []  # others may come online in a moment: one larger cohort beats two small ones
        members = tuple(free[: self.cfg.max_sites])
        bound = self.core.norm_bound
        ann = m.CohortAnnouncement(
            self.core.cfg.aggregator.federation,
            secrets.token_hex(16),
            self.core.served_version,  # what the members hold (a plant serves central versions, not its reduces)
            members,
            len(members) // 2 + 1,
            self.core.cfg.strategy.min_sites,
            now + self.cfg.deadline_s,
            now,
            bound,
            {s: 1.0 for s in members},
        )
        unmasker, blob = CohortUnmasker.announce(ann, self.core.enrollment, self.core.keys, self.clock)
        self.cohorts[ann.cohort] = _Cohort(unmasker)
        self._save_open()  # before the announcement leaves: a restart must know to fail it
        event(
            log,
            "secagg.cohort_announced",
            cohort=ann.cohort,
            base_version=ann.base_version,
            members=list(members),
            threshold=ann.threshold,
            deadline_s=self.cfg.deadline_s,
        )
        return [Outgoing(self.topics.secagg_cohort(ann.cohort), self._for_members(blob), retain=True)]

    def _close(self, c: _Cohort, now: float) -> list[Outgoing]:
        try:
            blob = c.unmasker.close()
        except SecAggError as exc:
            return self._fail(c, exc.detail)
        c.closed_at = now
        s = c.unmasker.survivors
        assert s is not None
        event(log, "secagg.survivors", cohort=c.ann.cohort, survivors=list(s.survivors), dropped=list(s.dropped))
        return [Outgoing(self.topics.secagg_survivors(c.ann.cohort), self._for_members(blob), retain=True)]

    def _for_members(self, signed: bytes) -> bytes:
        """A signed announcement sealed under the current epoch's key: the broker reads no member, weight or survivor."""
        epoch, key = self.content_key()
        return seal_notice(signed, epoch, key)

    # ------------------------------------------------------------------ submissions
    def _receipt(self, receipt: dict[str, Any]) -> list[Outgoing]:
        """The receipt sealed to its site; none for a site no longer enrolled (revoked: no key to seal to)."""
        blob = self.core.sign_receipt(receipt)
        return [] if blob is None else [Outgoing(self.topics.receipts(receipt["site"]), blob)]

    def on_submission(self, op: Opened) -> list[Outgoing]:
        """A masked update, opened and signature-checked by the core: hold it in its cohort."""
        core, h = self.core, op.header
        assert h is not None and op.tensors is not None
        top = core._top_counter(h.site)
        if top is not None and h.counter <= top:
            prev = core.store.verdict(h.site, h.counter)
            if prev is not None:  # a resend: its verdict again
                return self._receipt(prev.receipt())
            return self._receipt(
                core._refuse(
                    h.site, h.counter, h.msg_id, "replay", f"counter {h.counter} is not above {top}", store=False
                ).receipt
            )
        try:
            sub = m.MaskedSubmission.decode(op.tensors["secagg"].tobytes())
            c = self.cohorts.get(sub.cohort)
            if c is None:
                raise SecAggError("wrong_cohort", f"cohort {sub.cohort} is not open (finished, failed or unknown)")
            if h.base_version != c.ann.base_version:
                raise SecAggError(
                    "wrong_cohort", f"trained on version {h.base_version}, the cohort's base is {c.ann.base_version}"
                )
            if sub.masked.size != self.size:
                raise SecAggError("schema", f"{sub.masked.size} masked values, the model has {self.size}")
            c.unmasker.add_submission(sub, h.site)
        except SecAggError as exc:
            self._count_refusal(exc.reason)
            return self._receipt(core._refuse(h.site, h.counter, h.msg_id, f"secagg_{exc.reason}", exc.detail).receipt)
        core.heard(h)
        c.held[h.site] = (h.counter, h.msg_id, h.n_samples)
        v = Verdict(h.site, h.counter, h.msg_id, "buffered", None, None, core.version, 0, 1.0)
        core.store.record(v)
        core._decided(h.site, h.counter)
        core.metrics.decided("buffered")
        event(
            log,
            "secagg.submitted",
            cohort=sub.cohort,
            site=h.site,
            counter=h.counter,
            held=len(c.held),
            of=c.ann.n,
            clamped=sub.clamped,
        )
        return self._receipt(v.receipt())

    # ------------------------------------------------------------------ acks and answers
    def on_reply(self, topic_site: str, payload: bytes) -> list[Outgoing]:
        """A member's ack or answer (signed and sealed): relay requests, finish when complete."""
        try:
            site, kind, cohort, body = m.open_reply(payload, self.core.keys, self.core.enrollment)
            if site != topic_site:
                raise SecAggError("not_member", f"reply signed by {site!r} came on {topic_site!r}'s topic")
            c = self.cohorts.get(cohort)
            if c is None:
                return []  # a late reply to a finished cohort
            u = c.unmasker
            if kind == "ack":
                u.add_ack(site, body)
                if len(u.acks) < c.ann.threshold:
                    return []
                sites = self.core.enrollment.sites  # a member revoked since it acked gets nothing
                out = [
                    Outgoing(self.topics.secagg_request(s), u.request_for(s).seal(sites[s].box_pub))
                    for s in sorted(u.acks)
                    if s not in c.requested and s in sites
                ]
                c.requested.update(u.acks)
                return out
            refused = u.add_answer(m.Answer.decode(body), site)
            for _, reason in refused:
                self._count_refusal(reason)
            if refused:
                event(log, "secagg.shares_refused", level=logging.WARNING, cohort=cohort, site=site, refused=refused)
            return self._finish(c) if not u.missing() else []
        except SecAggError as exc:
            self._count_refusal(exc.reason)
            event(
                log,
                "secagg.reply_refused",
                level=logging.WARNING,
                site=topic_site,
                reason=exc.reason,
                detail=exc.detail,
            )
            return []

    # ------------------------------------------------------------------ the end of a cohort
    def _end(self, c: _Cohort) -> list[Outgoing]:
        del self.cohorts[c.ann.cohort]
        self._save_open()
        return [
            Outgoing(self.topics.secagg_cohort(c.ann.cohort), b"", retain=True),
            Outgoing(self.topics.secagg_survivors(c.ann.cohort), b"", retain=True),
        ]

    def _fail(self, c: _Cohort, detail: str) -> list[Outgoing]:
        core = self.core
        out = []
        for site, (counter, msg_id, _) in sorted(c.held.items()):
            v = Verdict(site, counter, msg_id, "rejected", "secagg_cohort_failed", detail, core.version)
            core.store.record(v)
            core.metrics.decided("rejected", "secagg_cohort_failed")
            out += self._receipt(v.receipt())
        self.stats["cohorts_failed"] += 1
        core.store.set_meta("secagg_cohorts_failed", str(self.stats["cohorts_failed"]))  # for reports after exit
        event(
            log,
            "secagg.cohort_failed",
            level=logging.WARNING,
            cohort=c.ann.cohort,
            detail=detail,
            submitted=sorted(c.held),
        )
        return out + self._end(c)

    def _finish(self, c: _Cohort) -> list[Outgoing]:
        """Unmask the cohort's sum, check its norm and staleness, and commit the new version (or fail the cohort)."""
        core, u = self.core, c.unmasker
        s = u.survivors
        assert s is not None
        try:
            total = u.cohort_sum()
        except SecAggError as exc:
            return self._fail(c, exc.detail)
        k = len(s.survivors)
        bound = core.norm_bound
        norm = float(np.linalg.norm(total))
        if norm > k * bound:
            return self._fail(c, f"cohort sum norm {norm:.4g} exceeds {k} x the per-site bound {bound}")
        staleness = core.version - c.ann.base_version
        if staleness > core.cfg.strategy.max_staleness:
            return self._fail(c, f"cohort staleness {staleness} > max_staleness {core.cfg.strategy.max_staleness}")
        factor = core.strategy.factor(staleness)
        step = unflatten(total * (core.cfg.strategy.server_lr * factor / k), core.reference)
        model = {name: (core.model[name] + step[name]).astype(np.float32) for name in core.model}
        lineage = self._lineage(c, staleness, factor, norm)
        applied = [
            Verdict(site, c.held[site][0], c.held[site][1], "applied", None, None, core.version + 1, staleness, 1.0)
            for site in s.survivors
        ]
        receipts = core.commit(model, core.momentum, lineage, applied)
        silent = [x for x in s.survivors if x not in u.answered]
        self.stats["cohorts"] += 1
        self.stats["dropouts_recovered"] += len(s.dropped) + len(silent)
        low = self.stats["min_cohort_sites"]
        self.stats["min_cohort_sites"] = k if low is None else min(low, k)
        event(
            log,
            "secagg.cohort_applied",
            cohort=c.ann.cohort,
            version=core.version,
            survivors=k,
            dropped=list(s.dropped),
            silent=silent,
            staleness=staleness,
            sum_norm=round(norm, 6),
        )
        return [o for r in receipts for o in self._receipt(r)] + self._end(c)

    def _lineage(self, c: _Cohort, staleness: int, factor: float, norm: float) -> dict[str, Any]:
        """The new version's lineage: the cohort, who dropped out or stayed silent, and each survivor's update."""
        core, u = self.core, c.unmasker
        s = u.survivors
        assert s is not None
        return {
            "strategy": "fedbuff-secagg",
            "parent": core.version,
            "cohort": c.ann.cohort,
            "base_version": c.ann.base_version,
            "staleness": staleness,
            "factor": factor,
            "dropped": list(s.dropped),
            "silent": [x for x in s.survivors if x not in u.answered],
            "sum_norm": norm,
            "updates": [
                {
                    "site": site,
                    "counter": c.held[site][0],
                    "msg_id": c.held[site][1],
                    "base_version": c.ann.base_version,
                    "n_samples": c.held[site][2],
                    "staleness": staleness,
                    "factor": factor,
                    "weight": 1.0,
                }
                for site in s.survivors
            ],
        }
