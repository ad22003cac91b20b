"""The protocol end to end with real keys, real sealed boxes and real SQLite answer logs:
exact cohort sums with dropouts, what a compromised aggregator sees, a malicious aggregator,
and hostile input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from broker_bridge import envelope
from broker_bridge.errors import SecAggError
from broker_bridge.secagg import messages as m
from broker_bridge.secagg import prg, quantise, seeds, shamir
from broker_bridge.secagg.unmask import CohortUnmasker
from tests.secagg.helpers import SITES, announcement, deltas, make_federation, run_to_answers


def _cohort(tmp_path, **kw):
    fed = make_federation(tmp_path)
    ann = announcement(**kw)
    unmasker, blob = CohortUnmasker.announce(ann, fed.enrollment, fed.aggregator)
    members = {s: fed.member(s) for s in SITES}
    for s in SITES:
        members[s].accept_cohort(blob)
    return fed, ann, unmasker, blob, members


def test_five_members_one_drops_after_submitting_one_never_submits(tmp_path) -> None:
    weights = {"site-a": 0.5, "site-b": 1.0, "site-c": 2.0, "site-d": 1.5, "site-e": 1.0}
    fed, ann, unmasker, _, members = _cohort(tmp_path, weights=weights, clip_range=0.2)
    x = deltas(SITES, 10_000)
    for s in ("site-a", "site-b", "site-c", "site-d"):  # site-e never submits
        unmasker.add_submission(m.MaskedSubmission.decode(members[s].mask(ann.cohort, x[s]).encode()), s)
    # site-d went offline right after submitting: only a, b, c acknowledge and answer (t = 3)
    run_to_answers(fed, members, unmasker, ("site-a", "site-b", "site-c"))
    assert unmasker.survivors.dropped == ("site-e",)
    total = unmasker.cohort_sum()
    # the plain weighted sum of the four submitted deltas, written out
    expected = 0.5 * x["site-a"] + 1.0 * x["site-b"] + 2.0 * x["site-c"] + 1.5 * x["site-d"]
    bound = 5 * 5 * 0.2 / (2**31 - 1 - 5)  # n / scale with scale = (2^31 - 1 - n) / (n R)
    err = np.abs(total - expected).max()
    assert err < bound
    assert err > 0  # it is a quantised sum, not a copy of the inputs


def test_fewer_answers_than_the_threshold_fail_cleanly(tmp_path) -> None:
    fed, ann, unmasker, _, members = _cohort(tmp_path)
    x = deltas(SITES, 100)
    for s in SITES[:4]:
        unmasker.add_submission(members[s].mask(ann.cohort, x[s]), s)
    with pytest.raises(SecAggError) as exc:
        run_to_answers(fed, members, unmasker, ("site-a", "site-b"))  # 2 acks < t = 3
    assert exc.value.reason == "consistency"
    with pytest.raises(SecAggError) as exc:
        unmasker.cohort_sum()
    assert exc.value.reason == "too_few"


def test_too_few_submissions_fail_the_cohort_cleanly(tmp_path) -> None:
    _, ann, unmasker, _, members = _cohort(tmp_path)
    for s in SITES[:2]:
        unmasker.add_submission(members[s].mask(ann.cohort, np.zeros(10)), s)
    with pytest.raises(SecAggError) as exc:
        unmasker.close()
    assert exc.value.reason == "too_few"


def test_opened_updates_are_independent_of_the_delta(tmp_path) -> None:
    """A compromised aggregator opens each sealed update with its own private key: what it
    reads is uniform over Z_{2^32} and uncorrelated with the site's delta."""
    fed, ann, _, _, members = _cohort(tmp_path, clip_range=0.05)
    n = 100_000
    x = np.random.default_rng(3).normal(0.0, 0.01, n)
    sub = members["site-b"].mask(ann.cohort, x)
    header = envelope.UpdateHeader(site="site-b", counter=1, msg_id="m-1", base_version=7, n_samples=10)
    sealed = envelope.seal_update(
        header,
        {"secagg": np.frombuffer(sub.encode(), dtype=np.uint8)},
        fed.keys["site-b"],
        fed.aggregator.public().box_pub,
    )
    _, tensors = envelope.open_update(sealed, fed.aggregator, fed.enrollment)
    seen = m.MaskedSubmission.decode(tensors["secagg"].tobytes()).masked

    def chi2_top_byte(v: np.ndarray) -> float:
        counts = np.bincount((v >> 24).astype(np.int64), minlength=256)
        expected = v.size / 256
        return float(((counts - expected) ** 2 / expected).sum())

    # the masks come from the OS's generator, so these are statistical: each bound is set where an honest
    # run fails about once in a million (the 0.001 / 3.2-sigma bounds here before failed ~0.3 % of runs)
    critical = 377.1  # chi-square, 255 degrees of freedom, p = 1e-6
    corr_bound = 5.0 / np.sqrt(n)  # 5 standard deviations of the correlation of n independent pairs
    assert chi2_top_byte(seen) < critical
    assert abs(np.corrcoef(seen.astype(np.float64), x)[0, 1]) < corr_bound
    assert abs(np.corrcoef(seen.view(np.int32).astype(np.float64), x)[0, 1]) < corr_bound
    # the same statistics do see the delta when it is only quantised, not masked
    plain, _ = quantise.quantise(x, ann.clip_range, ann.n)
    assert chi2_top_byte(plain) > critical
    assert np.corrcoef(plain.view(np.int32).astype(np.float64), x)[0, 1] > 0.99


def test_malicious_aggregator_cannot_unmask_a_site_it_declares_dropped(tmp_path) -> None:
    """Scripted aggregator: site-c submitted, the aggregator says it dropped, collects the
    pair-seed shares, then (after every member restarts) claims site-c survived to get its
    self-mask shares. It never gets one."""
    fed, ann, honest, _, members = _cohort(tmp_path)
    x = deltas(SITES, 100_000, scale=0.01)
    subs = {s: members[s].mask(ann.cohort, x[s]) for s in SITES}
    for s in SITES:
        honest.add_submission(subs[s], s)
    # lie 1: site-c "dropped"
    lie = m.SurvivorsAnnouncement(
        ann.federation, ann.cohort, honest.cohort_hash, ("site-a", "site-b", "site-d", "site-e"), ("site-c",), 0.0
    )
    lie_blob = m.sign_survivors(lie, fed.aggregator)
    lie_hash = m.blob_hash(lie_blob)
    acks = {s: members[s].ack(lie_blob) for s in SITES}
    answers = {}
    for s in SITES:  # it even relays site-c's own bundles, hoping for its self-mask shares
        req = m.UnmaskRequest(lie_blob, acks, {d: subs[d].bundles[s] for d in SITES})
        answers[s] = members[s].answer(req)
        assert "site-c" not in answers[s].self_shares
        assert answers[s].refused["site-c"] == "not_member"
    # every member restarts (new process, same SQLite file)
    for s in SITES:
        members[s].close()
        members[s] = fed.member(s)
    # lie 2: site-c "survived"
    lie2 = dataclasses.replace(lie, survivors=SITES, dropped=(), created_at=1.0)
    lie2_blob = m.sign_survivors(lie2, fed.aggregator)
    for s in SITES:
        with pytest.raises(SecAggError) as exc:
            members[s].ack(lie2_blob)
        assert exc.value.reason == "equivocation"
        # with acks it cannot have, the request fails the consistency check first
        with pytest.raises(SecAggError) as exc:
            members[s].answer(m.UnmaskRequest(lie2_blob, acks, {d: subs[d].bundles[s] for d in SITES}))
        assert exc.value.reason == "consistency"
        # re-sending the first request only repeats the first answers (no self share of site-c)
        again = members[s].answer(m.UnmaskRequest(lie_blob, acks, {d: subs[d].bundles[s] for d in SITES}))
        assert "site-c" not in again.self_shares
        assert members[s].log.roles(ann.cohort)["site-c"] == "dropped"
    # what the aggregator now holds about site-c: its masked vector and all its pair seeds
    # (reconstructed from the pair shares its peers dealt), and no share of b_c
    ch = honest.cohort_hash
    pair_of_c = {}
    for dealer in ("site-a", "site-b", "site-d", "site-e"):
        shares = {SITES.index(s) + 1: answers[s].pair_shares[dealer]["site-c"] for s in SITES[:3]}
        pair_of_c[dealer] = shamir.reconstruct(shares).to_bytes(32, "big")
        assert pair_of_c[dealer] == seeds.pair_seed(
            bytes(fed.keys[dealer].box_key), fed.keys["site-c"].public().box_pub, ch, dealer, "site-c"
        )
    stripped = np.array(subs["site-c"].masked, dtype=np.uint32)
    for dealer, s in pair_of_c.items():
        if dealer > "site-c":
            stripped -= prg.mask(s, stripped.size)
        else:
            stripped += prg.mask(s, stripped.size)
    # still hidden by PRG(b_c): uncorrelated with site-c's delta
    assert abs(np.corrcoef(stripped.view(np.int32).astype(np.float64), x["site-c"])[0, 1]) < 0.01
    assert lie_hash != m.blob_hash(lie2_blob)


# --------------------------------------------------------------------------- hostile input
def test_announcement_not_signed_by_the_aggregator_is_refused(tmp_path) -> None:
    fed = make_federation(tmp_path)
    forged = m.sign_cohort(announcement(), fed.keys["site-a"])  # a site's key, not the aggregator's
    member = fed.member("site-b")
    with pytest.raises(SecAggError) as exc:
        member.accept_cohort(forged)
    assert exc.value.reason == "signature"
    assert member.refused["signature"] == 1


def test_replayed_announcement_is_refused_even_after_a_restart(tmp_path) -> None:
    fed = make_federation(tmp_path)
    blob = m.sign_cohort(announcement(), fed.aggregator)
    fed.member("site-a").accept_cohort(blob)
    for _ in range(2):
        with pytest.raises(SecAggError) as exc:
            fed.member("site-a").accept_cohort(blob)
        assert exc.value.reason == "replay"


def test_expired_foreign_and_non_member_announcements_are_refused(tmp_path) -> None:
    fed = make_federation(tmp_path)
    cases = [
        (announcement(deadline_in=-1.0), "expired"),
        (announcement(federation="other"), "federation"),
        (announcement(sites=("site-b", "site-c", "site-d")), "not_member"),
    ]
    for ann, reason in cases:
        with pytest.raises(SecAggError) as exc:
            fed.member("site-a").accept_cohort(m.sign_cohort(ann, fed.aggregator))
        assert exc.value.reason == reason
    with pytest.raises(SecAggError) as exc:  # the aggregator refuses to sign a threshold <= n/2
        m.sign_cohort(announcement(threshold=2), fed.aggregator)
    assert exc.value.reason == "schema"


def test_masking_twice_in_one_cohort_is_refused_across_restarts(tmp_path) -> None:
    fed, ann, _, _, members = _cohort(tmp_path)
    members["site-a"].mask(ann.cohort, np.zeros(5))
    members["site-a"].close()
    with pytest.raises(SecAggError) as exc:
        fed.member("site-a").mask(ann.cohort, np.ones(5))
    assert exc.value.reason == "state"


def test_bad_shares_and_shares_of_another_cohort_are_refused_and_the_cohort_completes(tmp_path) -> None:
    fed, ann, unmasker, _, members = _cohort(tmp_path)
    # a second cohort of the same sites, to take bundles from
    ann2 = announcement()
    _other, blob2 = CohortUnmasker.announce(ann2, fed.enrollment, fed.aggregator)
    for s in SITES:
        members[s].accept_cohort(blob2)
    other_sub = members["site-a"].mask(ann2.cohort, np.zeros(50))

    x = deltas(SITES, 50)
    subs = {s: members[s].mask(ann.cohort, x[s]) for s in SITES}
    for s in SITES:
        unmasker.add_submission(subs[s], s)
    sblob = unmasker.close()
    for s in SITES:
        unmasker.add_ack(s, members[s].ack(sblob))

    # shares for another cohort: the aggregator relays site-a's bundle of cohort 2 to site-b
    req = unmasker.request_for("site-b")
    req = dataclasses.replace(req, bundles={**req.bundles, "site-a": other_sub.bundles["site-b"]})
    ans_b = members["site-b"].answer(req)
    assert ans_b.refused["site-a"] == "wrong_cohort"
    assert "site-a" not in ans_b.self_shares
    assert unmasker.add_answer(ans_b, "site-b") == []

    # a bad share: site-c's answer has one self-mask share altered (e.g. corrupted or lying)
    ans_c = members["site-c"].answer(unmasker.request_for("site-c"))
    tampered = dict(ans_c.self_shares)
    tampered["site-d"] = (tampered["site-d"] + 1) % (2**256)
    refused = unmasker.add_answer(dataclasses.replace(ans_c, self_shares=tampered), "site-c")
    assert refused == [("site-d", "bad_share")]
    assert unmasker.refused["bad_share"] == 1

    # an answer about another cohort
    with pytest.raises(SecAggError) as exc:
        unmasker.add_answer(
            dataclasses.replace(members["site-d"].answer(unmasker.request_for("site-d")), cohort=ann2.cohort), "site-d"
        )
    assert exc.value.reason == "wrong_cohort"

    for s in ("site-d", "site-e"):
        unmasker.add_answer(members[s].answer(unmasker.request_for(s)), s)
    expected = sum(x[s] for s in SITES)
    assert np.abs(unmasker.cohort_sum() - expected).max() < quantise.error_bound(ann.clip_range, ann.n)


def test_a_submission_for_another_cohort_or_from_an_impostor_is_refused(tmp_path) -> None:
    _fed, ann, unmasker, _, members = _cohort(tmp_path)
    sub = members["site-a"].mask(ann.cohort, np.zeros(10))
    for signer, mutated, reason in [
        ("site-b", sub, "not_member"),  # site-b relays site-a's submission as its own
        ("site-a", dataclasses.replace(sub, cohort_hash=b"\x00" * 32), "wrong_cohort"),
    ]:
        with pytest.raises(SecAggError) as exc:
            unmasker.add_submission(mutated, signer)
        assert exc.value.reason == reason
    unmasker.add_submission(sub, "site-a")
    with pytest.raises(SecAggError) as exc:
        unmasker.add_submission(sub, "site-a")
    assert exc.value.reason == "replay"


def test_malformed_messages_are_refused_as_schema() -> None:
    for raw in (b"", b"FLQ1\xff\xff\xff\xff", b"FLQ1" + b"\x02\x00\x00\x00{}"):
        with pytest.raises(SecAggError) as exc:
            m.MaskedSubmission.decode(raw)
        assert exc.value.reason == "schema"
    for raw in (b"[]", b'{"survivors": 1}', b"\xff"):
        with pytest.raises(SecAggError) as exc:
            m.UnmaskRequest.decode(raw)
        assert exc.value.reason == "schema"
    with pytest.raises(SecAggError) as exc:
        m.Answer.decode(b'{"federation": "x"}')
    assert exc.value.reason == "schema"
