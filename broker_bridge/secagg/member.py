"""The site's side of secure aggregation: join, mask once, acknowledge, answer.

A member holds no secret between masking and answering except in its own head: the self
mask b_i and the pair seeds are dealt as Shamir shares inside the member's one update, so a
member may crash or go offline right after submitting and the cohort still completes (its
peers answer for it). What a member must remember is in :class:`AnswerLog`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from broker_bridge.errors import SecAggError
from broker_bridge.keys import Enrollment, KeyPair
from broker_bridge.secagg import messages as m
from broker_bridge.secagg import prg, quantise, seeds, shamir
from broker_bridge.secagg.answer_log import AnswerLog


class SecAggMember:
    """One site's participation in cohorts, backed by an on-disk answer log."""

    def __init__(
        self, keys: KeyPair, enrollment: Enrollment, log_path: str | Path, clock: Callable[[], float] = time.time
    ) -> None:
        self.keys = keys
        self.enrollment = enrollment
        self.log = AnswerLog(log_path)
        self.clock = clock
        self.refused: Counter[str] = Counter()  # reason -> count, for metrics

    def close(self) -> None:
        self.log.close()

    def _refuse(self, reason: str, detail: str) -> SecAggError:
        self.refused[reason] += 1
        return SecAggError(reason, detail)

    # ------------------------------------------------------------------ join
    def accept_cohort(self, blob: bytes) -> m.CohortAnnouncement:
        """Verify a cohort announcement addressed to this site and remember it (once)."""
        try:
            ann, ch = m.open_cohort(blob, self.enrollment.aggregator.sign_pub, self.enrollment.federation)
            if self.keys.ident not in ann.members:
                raise SecAggError("not_member", f"this site is not a member of cohort {ann.cohort}")
            strangers = [s for s in ann.members if s not in self.enrollment.sites]
            if strangers:
                raise SecAggError("not_member", f"cohort members {', '.join(strangers)} are not enrolled")
            if ann.deadline <= self.clock():
                raise SecAggError("expired", f"cohort {ann.cohort} passed its deadline")
            self.log.join(ann.cohort, ch, bytes(blob))
        except SecAggError as exc:
            self.refused[exc.reason] += 1
            raise
        return ann

    def _cohort(self, cohort: str) -> tuple[m.CohortAnnouncement, bytes, str]:
        row = self.log.announcement(cohort)
        if row is None:
            raise self._refuse("wrong_cohort", f"this site never joined cohort {cohort}")
        ann, ch = m.open_cohort(row[0], self.enrollment.aggregator.sign_pub, self.enrollment.federation)
        return ann, ch, row[2]

    # ------------------------------------------------------------------ mask
    def mask(self, cohort: str, delta: np.ndarray, rng: np.random.Generator | None = None) -> m.MaskedSubmission:
        """Weight, quantise and mask a flat delta; deal the shares. Once per cohort, durably."""
        ann, ch, _ = self._cohort(cohort)
        me = self.keys.ident
        self.log.mark_submitted(cohort)  # before any secret exists: a crash here only drops us
        q, clamped = quantise.quantise(
            np.asarray(delta, dtype=np.float64) * ann.weights[me], ann.clip_range, ann.n, rng
        )
        b = seeds.self_seed()
        y = q + prg.mask(b, q.size)  # uint32 arithmetic wraps: this is Z_{2^32}
        secrets_by_slot: list[int] = []
        own_secret = bytes(self.keys.box_key)
        for j in ann.members:
            if j == me:
                secrets_by_slot.append(int.from_bytes(b, "big"))
                continue
            s = seeds.pair_seed(own_secret, self.enrollment.sites[j].box_pub, ch, me, j)
            if j > me:
                y += prg.mask(s, q.size)
            else:
                y -= prg.mask(s, q.size)
            secrets_by_slot.append(int.from_bytes(s, "big"))
        shares = [shamir.split(sec, ann.n, ann.threshold) for sec in secrets_by_slot]
        bundles, roots = {}, {}
        for pk, k in enumerate(ann.members):
            mine = [shares[p][pk] for p in range(ann.n)]
            roots[k] = m.root(m.leaves(ch, me, k, mine))
            bundles[k] = m.seal_bundle(self.keys, self.enrollment.sites[k].box_pub, ch, k, mine)
        return m.MaskedSubmission(cohort, ch, me, y, bundles, roots, clamped)

    # ------------------------------------------------------------------ consistency check
    def _survivors(self, blob: bytes) -> tuple[m.SurvivorsAnnouncement, bytes, m.CohortAnnouncement, bytes]:
        try:
            doc, sh = m.open_survivors(blob, self.enrollment.aggregator.sign_pub)
        except SecAggError as exc:
            self.refused[exc.reason] += 1
            raise
        ann, ch, _ = self._cohort(doc.cohort)
        try:
            doc.check_against(ann, ch)
        except SecAggError as exc:
            self.refused[exc.reason] += 1
            raise
        return doc, sh, ann, ch

    def ack(self, survivors_blob: bytes) -> bytes:
        """Sign the survivors announcement: this member will answer no other in this cohort."""
        doc, sh, _, _ = self._survivors(survivors_blob)
        try:
            self.log.pin_ack(doc.cohort, sh)
        except SecAggError as exc:
            self.refused[exc.reason] += 1
            raise
        return m.sign_ack(self.keys, doc.federation, doc.cohort, sh)

    # ------------------------------------------------------------------ answer
    def answer(self, request: m.UnmaskRequest) -> m.Answer:
        """The shares the aggregator needs, and nothing that contradicts an earlier answer."""
        doc, sh, ann, ch = self._survivors(request.survivors_blob)
        valid = 0
        for s, sig in sorted(request.acks.items()):
            if valid >= ann.threshold:
                break
            valid += s in ann.members and m.ack_is_valid(
                self.enrollment.sites[s].sign_pub, sig, doc.federation, doc.cohort, sh
            )
        if valid < ann.threshold:
            raise self._refuse(
                "consistency", f"{valid} valid acks of the survivors announcement, {ann.threshold} needed"
            )
        try:
            self.log.pin_ack(doc.cohort, sh)
            roles = {s: "survivor" for s in doc.survivors} | {s: "dropped" for s in doc.dropped}
            self.log.record_roles(doc.cohort, roles)  # durable before any share leaves
        except SecAggError as exc:
            self.refused[exc.reason] += 1
            raise
        me = self.keys.ident
        self_shares, pair_shares, leaves, refused = {}, {}, {}, {}
        for dealer, blob in sorted(request.bundles.items()):
            if dealer not in doc.survivors:
                refused[dealer] = "not_member"
                self.refused["not_member"] += 1
                continue
            try:
                shares = m.open_bundle(blob, self.keys, self.enrollment, ch, dealer, ann.n)
            except SecAggError as exc:
                refused[dealer] = exc.reason
                self.refused[exc.reason] += 1
                continue
            self_shares[dealer] = shares[ann.position(dealer)]
            pair_shares[dealer] = {j: shares[ann.position(j)] for j in doc.dropped}
            leaves[dealer] = m.leaves(ch, dealer, me, shares)
        return m.Answer(doc.federation, doc.cohort, sh, me, self_shares, pair_shares, leaves, refused)
