"""The aggregator's side of one cohort: collect masked updates, run the consistency check,
check every share against its dealer's commitment, reconstruct, and remove the masks.

What this object ever holds: masked vectors (uniform in Z_{2^32} to anyone without the seeds),
for each survivor its self-mask seed, and for each (survivor, dropped) pair its pair seed. The
survivors' pair seeds with each other are never revealed, so no single survivor's vector can be
unmasked; they cancel only in the sum.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import numpy as np

from broker_bridge.errors import SecAggError
from broker_bridge.keys import Enrollment, KeyPair
from broker_bridge.secagg import messages as m
from broker_bridge.secagg import prg, quantise, shamir


class CohortUnmasker:
    """One open cohort at the aggregator, from announcement to cohort sum (or clean failure)."""

    def __init__(
        self,
        ann: m.CohortAnnouncement,
        cohort_hash: bytes,
        enrollment: Enrollment,
        aggregator_keys: KeyPair,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ann = ann
        self.cohort_hash = cohort_hash
        self.enrollment = enrollment
        self.keys = aggregator_keys
        self.clock = clock
        self.submissions: dict[str, m.MaskedSubmission] = {}
        self.survivors: m.SurvivorsAnnouncement | None = None
        self.survivors_blob = b""
        self.survivors_hash = b""
        self.acks: dict[str, bytes] = {}
        self.answered: set[str] = set()
        self._self_shares: dict[str, dict[int, int]] = {}  # dealer -> {x: share of b_dealer}
        self._pair_shares: dict[tuple[str, str], dict[int, int]] = {}  # (dealer, dropped) -> {x: share}
        self.refused: Counter[str] = Counter()  # reason -> count (whole messages and single shares)
        self._positions = {s: i for i, s in enumerate(ann.members)}  # slot of each member (Shamir x - 1)

    @classmethod
    def announce(
        cls,
        ann: m.CohortAnnouncement,
        enrollment: Enrollment,
        aggregator_keys: KeyPair,
        clock: Callable[[], float] = time.time,
    ) -> tuple[CohortUnmasker, bytes]:
        """Sign a cohort announcement; return the cohort's state and the blob to publish (retained)."""
        blob = m.sign_cohort(ann, aggregator_keys)
        return cls(ann, m.blob_hash(blob), enrollment, aggregator_keys, clock), blob

    def _refuse(self, reason: str, detail: str) -> SecAggError:
        self.refused[reason] += 1
        return SecAggError(reason, detail)

    # ------------------------------------------------------------------ submissions
    def add_submission(self, sub: m.MaskedSubmission, signer: str) -> None:
        """Take one member's masked update (``signer`` is who signed the update that carried it)."""
        if self.survivors is not None:
            raise self._refuse("state", f"cohort {self.ann.cohort} is closed; {signer!r} submitted too late")
        if sub.cohort != self.ann.cohort or sub.cohort_hash != self.cohort_hash:
            raise self._refuse("wrong_cohort", f"submission from {signer!r} is for cohort {sub.cohort}")
        if sub.site != signer or signer not in self.ann.members:
            raise self._refuse(
                "not_member",
                f"submission names {sub.site!r}, signed by {signer!r}, members are {list(self.ann.members)}",
            )
        if signer in self.submissions:
            raise self._refuse("replay", f"{signer!r} already submitted to cohort {self.ann.cohort}")
        if sorted(sub.bundles) != list(self.ann.members) or sorted(sub.roots) != list(self.ann.members):
            raise self._refuse("schema", f"submission from {signer!r} must deal one bundle to each member")
        first = next(iter(self.submissions.values()), None)
        if first is not None and first.masked.size != sub.masked.size:
            raise self._refuse(
                "schema", f"submission from {signer!r} has {sub.masked.size} values, others have {first.masked.size}"
            )
        self.submissions[signer] = sub

    # ------------------------------------------------------------------ survivors and acks
    def close(self) -> bytes:
        """After the deadline: sign who survived. Raises ``too_few`` if the cohort must fail."""
        if self.survivors is None:
            s = tuple(sorted(self.submissions))
            if len(s) < self.ann.min_survivors:
                raise SecAggError(
                    "too_few", f"cohort {self.ann.cohort}: {len(s)} members submitted, {self.ann.min_survivors} needed"
                )
            d = tuple(x for x in self.ann.members if x not in self.submissions)
            self.survivors = m.SurvivorsAnnouncement(
                self.ann.federation, self.ann.cohort, self.cohort_hash, s, d, self.clock()
            )
            self.survivors_blob = m.sign_survivors(self.survivors, self.keys)
            self.survivors_hash = m.blob_hash(self.survivors_blob)
        return self.survivors_blob

    def add_ack(self, site: str, sig: bytes) -> None:
        if self.survivors is None:
            raise self._refuse("state", "no survivors announcement to acknowledge yet")
        if site not in self.ann.members:
            raise self._refuse("not_member", f"ack from {site!r}, not a member")
        if not m.ack_is_valid(
            self.enrollment.sites[site].sign_pub, sig, self.ann.federation, self.ann.cohort, self.survivors_hash
        ):
            raise self._refuse("signature", f"ack from {site!r} does not verify")
        self.acks[site] = sig

    def request_for(self, site: str) -> m.UnmaskRequest:
        """The unmask request for one member: the announcement, the acks, the bundles dealt to it."""
        if len(self.acks) < self.ann.threshold:
            raise SecAggError("consistency", f"{len(self.acks)} acks, {self.ann.threshold} needed")
        assert self.survivors is not None
        return m.UnmaskRequest(
            self.survivors_blob,
            dict(self.acks),
            {d: self.submissions[d].bundles[site] for d in self.survivors.survivors},
        )

    # ------------------------------------------------------------------ answers
    def add_answer(self, answer: m.Answer, signer: str) -> list[tuple[str, str]]:
        """Check and keep an answer's shares; return the (dealer, reason) of each share refused."""
        if self.survivors is None:
            raise self._refuse("state", "answer before the survivors announcement")
        if answer.federation != self.ann.federation:
            raise self._refuse("federation", f"answer from {signer!r} is for federation {answer.federation!r}")
        if answer.cohort != self.ann.cohort or answer.survivors_hash != self.survivors_hash:
            raise self._refuse("wrong_cohort", f"answer from {signer!r} is about another cohort or announcement")
        if answer.site != signer or signer not in self.ann.members:
            raise self._refuse("not_member", f"answer names {answer.site!r}, signed by {signer!r}")
        if signer in self.answered:
            raise self._refuse("replay", f"{signer!r} already answered")
        self.answered.add(signer)
        pos = self._positions
        x = pos[signer] + 1
        dropped = set(self.survivors.dropped)
        bad: list[tuple[str, str]] = []
        for dealer, leaves in answer.leaves.items():
            sub = self.submissions.get(dealer)
            if sub is None or len(leaves) != self.ann.n or m.root(leaves) != sub.roots[signer]:
                bad.append((dealer, "bad_share"))
                continue
            share = answer.self_shares.get(dealer)
            pairs = answer.pair_shares.get(dealer, {})
            base = m.leaf_base(self.cohort_hash, dealer, signer)
            if (
                share is None
                or set(pairs) != dropped
                or m.leaf_from(base, pos[dealer], share) != leaves[pos[dealer]]
                or any(m.leaf_from(base, pos[j], y) != leaves[pos[j]] for j, y in pairs.items())
            ):
                bad.append((dealer, "bad_share"))
                continue
            self._self_shares.setdefault(dealer, {})[x] = share
            for j, y in pairs.items():
                self._pair_shares.setdefault((dealer, j), {})[x] = y
        stray = (set(answer.self_shares) | set(answer.pair_shares)) - set(answer.leaves)
        bad += [(d, "bad_share") for d in sorted(stray)]
        self.refused["bad_share"] += len(bad)
        return bad

    def missing(self) -> list[str]:
        """Secrets that do not yet have threshold-many verified shares (empty: ready to unmask)."""
        assert self.survivors is not None
        t = self.ann.threshold
        out = [f"b:{d}" for d in self.survivors.survivors if len(self._self_shares.get(d, {})) < t]
        out += [
            f"s:{d}:{j}"
            for d in self.survivors.survivors
            for j in self.survivors.dropped
            if len(self._pair_shares.get((d, j), {})) < t
        ]
        return out

    def cohort_sum(self) -> np.ndarray:
        """Sum of the survivors' weighted deltas (float64), or ``SecAggError('too_few')``.

        Exact up to quantisation: ``|error| < n / scale`` per coordinate (quantise.error_bound).
        """
        missing = self.missing()
        if missing:
            raise SecAggError(
                "too_few",
                f"cohort {self.ann.cohort}: {len(missing)} secrets lack "
                f"{self.ann.threshold} verified shares (first: {missing[0]})",
            )
        assert self.survivors is not None
        t = self.ann.threshold
        coeffs: dict[tuple[int, ...], dict[int, int]] = {}

        def secret(shares: dict[int, int]) -> bytes:
            xs = tuple(sorted(shares)[:t])
            if xs not in coeffs:
                coeffs[xs] = shamir.lagrange_at_zero(xs)
            value = shamir.reconstruct({x: shares[x] for x in xs}, coeffs[xs])
            if value >= 2**256:
                raise SecAggError("bad_share", "a reconstructed seed is not 32 bytes (inconsistent dealer)")
            return value.to_bytes(32, "big")

        subs = [self.submissions[s].masked for s in self.survivors.survivors]
        total = np.array(subs[0], dtype=np.uint32)
        for y in subs[1:]:
            total += y
        # (seed, +1/-1 to add/subtract its mask): self masks come off; a dealer added +PRG(s_dj) for a
        # dropped peer later in the order and -PRG(s_dj) for one earlier, so those come off with the other sign
        removals = [(secret(self._self_shares[d]), -1) for d in self.survivors.survivors]
        removals += [
            (secret(self._pair_shares[(d, j)]), -1 if j > d else 1)
            for d in self.survivors.survivors
            for j in self.survivors.dropped
        ]
        size = total.size
        # expanding the masks (ChaCha20) is the bulk of the work: one mask at a time, added in place (one
        # thread: OpenSSL's ChaCha20 runs at memory speed, and a second thread only contends for the GIL)
        for seed, sign in removals:
            if sign < 0:
                total -= prg.mask(seed, size)
            else:
                total += prg.mask(seed, size)
        return quantise.dequantise_sum(total, self.ann.clip_range, self.ann.n)
