"""The aggregator's cohort coordinator on a real AggregatorCore (SQLite on disk) with real members:
failures end with signed receipts that say so, hostile replies are refused, a complete cohort
becomes the next version."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from aggregator.core import AggregatorCore
from aggregator.secagg_cohort import CohortCoordinator, Outgoing
from broker_bridge.envelope import UpdateHeader, open_receipt
from broker_bridge.federation_key import Keyring, new_content_key
from broker_bridge.secagg import messages as m
from broker_bridge.topics import Topics
from edge.secagg_member import EdgeCohorts
from tests.aggregator.helpers import make_federation

SITES = ["site-a", "site-b", "site-c", "site-d"]
KEY = new_content_key()  # the federation content key of epoch 1: announcements are sealed under it
STRATEGY = 'kind = "fedbuff"\nsecure_aggregation = true\nnorm_bound = 2.0\nmin_sites = 3'


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def rig(tmp_path):
    fed = make_federation(tmp_path, SITES)
    core = AggregatorCore(fed.config(strategy=STRATEGY, extra="[secagg]\ngather_s = 0.0\ndeadline_s = 30.0"))
    topics = Topics("test")
    clock = Clock()
    coord = CohortCoordinator(core, topics, lambda: (1, KEY), clock)
    members = {s: EdgeCohorts(fed.sites[s], fed.enrollment, topics, tmp_path / s, Keyring({1: KEY})) for s in SITES}
    yield fed, core, coord, members, clock, topics
    core.close()
    for mem in members.values():
        mem.close()


def receipts(out: list[Outgoing], fed) -> dict[str, dict]:
    docs = {}
    for o in out:
        if o.topic.endswith("/receipts"):
            site = o.topic.split("/")[-2]  # receipts are sealed to their site: open with its key
            doc = open_receipt(o.payload, fed.sites[site], fed.agg.public().sign_pub)
            assert doc["site"] == site
            docs[site] = doc
    return docs


def submit(fed, core, coord, members, site: str, counter: int, delta: dict[str, np.ndarray]) -> list[Outgoing]:
    header = UpdateHeader(site=site, counter=counter, msg_id=f"m{counter}", base_version=core.version, n_samples=10)
    sealed = members[site].seal(header, delta)
    op = core.open(sealed, site)
    assert op.secagg and op.reason is None
    return coord.on_submission(op)


def announce(coord, members, sites) -> m.CohortAnnouncement:
    for s in sites:
        coord.on_status(s, json.dumps({"state": "online"}).encode())
    out = coord.tick()
    assert len(out) == 1 and out[0].retain and "/secagg/cohort/" in out[0].topic
    for s in sites:
        assert members[s].on_cohort(out[0].payload)
    return members[sites[0]].pending


def test_plain_updates_are_refused_and_a_short_cohort_fails_with_receipts(rig) -> None:
    fed, core, coord, members, clock, _ = rig
    plain, _ = fed.seal("site-a", {k: np.zeros_like(v) for k, v in core.model.items()}, 0)
    op = core.open(plain, "site-a")
    assert op.reason == "secagg_required"

    ann = announce(coord, members, ["site-a", "site-b", "site-c"])
    assert ann.members == ("site-a", "site-b", "site-c") and ann.threshold == 2
    zeros = {k: np.zeros_like(v) for k, v in core.model.items()}
    for s in ["site-a", "site-b"]:
        assert receipts(submit(fed, core, coord, members, s, 1, zeros), fed)[s]["verdict"] == "buffered"
    clock.now = ann.deadline + 1
    out = coord.tick()
    got = receipts(out, fed)
    assert {s: (r["verdict"], r["reason"]) for s, r in got.items()} == {
        "site-a": ("rejected", "secagg_cohort_failed"),
        "site-b": ("rejected", "secagg_cohort_failed"),
    }
    cleared = [o for o in out if o.retain]
    assert len(cleared) == 2 and all(o.payload == b"" for o in cleared)
    assert coord.stats["cohorts_failed"] == 1 and core.version == 0


def test_hostile_replies_are_refused_and_the_cohort_becomes_the_next_version(rig) -> None:
    fed, core, coord, members, clock, topics = rig
    ann = announce(coord, members, SITES)
    rng = np.random.default_rng(0)
    deltas = {
        s: {k: (rng.standard_normal(v.shape) * 0.01).astype(np.float32) for k, v in core.model.items()}
        for s in SITES[:3]
    }
    for s in SITES[:3]:  # site-d never submits
        submit(fed, core, coord, members, s, 1, deltas[s])
    clock.now = ann.deadline + 1
    [survivors] = coord.tick()
    acks = {s: members[s].on_survivors(survivors.payload) for s in SITES}
    # site-b's ack replayed on site-a's reply topic: refused, not counted
    assert coord.on_reply("site-a", acks["site-b"]) == []
    assert coord.stats["refused"] == {"not_member": 1}
    requests = []
    for s in SITES:
        requests += coord.on_reply(s, acks[s])
    assert sorted(o.topic for o in requests) == sorted(topics.secagg_request(s) for s in SITES)
    base = {k: v.astype(np.float64) for k, v in core.model.items()}
    out: list[Outgoing] = []
    for o in requests:
        site = o.topic.split("/")[-3]
        answer = members[site].on_request(o.payload)
        out += coord.on_reply(site, answer)
    assert core.version == 1
    got = receipts(out, fed)
    assert {s: r["verdict"] for s, r in got.items()} == {s: "applied" for s in SITES[:3]}
    # FedBuff, K = 3 survivors, staleness 0: x1 = x0 + (1/3) sum delta_i
    for k in base:
        expected = base[k] + sum(deltas[s][k].astype(np.float64) for s in SITES[:3]) / 3
        assert np.abs(core.model[k] - expected).max() < 1e-6
    assert coord.stats["cohorts"] == 1 and coord.stats["dropouts_recovered"] == 1
    assert core.lineage(1)["dropped"] == ["site-d"]


def test_what_the_broker_carries_of_a_cohort_is_sealed_for_members_or_for_one_member(rig) -> None:
    """Issue 13: the announcements name members, weights, threshold and survivors; the requests the acks.
    The broker sees the epoch of an announcement and nothing else; a request opens for its member only."""
    fed, core, coord, members, clock, topics = rig
    for s in SITES:
        coord.on_status(s, json.dumps({"state": "online"}).encode())
    [cohort] = coord.tick()
    assert cohort.payload[:3] == b"FLN" and not any(s.encode() in cohort.payload for s in SITES)
    assert b"weights" not in cohort.payload and b"threshold" not in cohort.payload
    outsider = EdgeCohorts(fed.sites["site-a"], fed.enrollment, topics, fed.root / "outsider", Keyring())
    try:  # a site without the epoch's key (not granted yet) joins nothing, and keeps it for the grant
        assert not outsider.on_cohort(cohort.payload, "c1") and outsider.pending is None
        assert [k for k, _, _ in outsider.take_waiting()] == ["secagg_cohort"]
    finally:
        outsider.close()
    for s in SITES:
        assert members[s].on_cohort(cohort.payload)
    ann = members["site-a"].pending
    assert ann is not None
    zeros = {k: np.zeros_like(v) for k, v in core.model.items()}
    for s in SITES:
        submit(fed, core, coord, members, s, 1, zeros)
    clock.now = ann.deadline + 1
    [survivors] = coord.tick()
    assert survivors.payload[:3] == b"FLN" and not any(s.encode() in survivors.payload for s in SITES)
    requests = []
    for s in SITES:
        requests += coord.on_reply(s, members[s].on_survivors(survivors.payload, ann.cohort))
    assert len(requests) == len(SITES)
    for o in requests:
        site = o.topic.split("/")[-3]
        assert o.payload[:3] == b"FLP" and b"site-" not in o.payload
        other = next(s for s in SITES if s != site)
        assert members[other].on_request(o.payload) is None  # sealed to its member: another cannot open it
        assert members[site].on_request(o.payload) is not None


def test_a_cohort_nobody_masked_into_is_superseded_once_a_newer_version_is_served(rig) -> None:
    """Members follow the served model, so a newer served version (a plant adopting a central one) leaves an
    empty cohort on the old base unable to finish: it is ended at the next tick and its members join one on
    the new base. A cohort someone has masked into runs on to its deadline."""
    fed, core, coord, members, _clock, topics = rig
    first = announce(coord, members, ["site-a", "site-b", "site-c"])
    assert first.base_version == 0
    core.commit({k: v + 1.0 for k, v in core.model.items()}, None, {"strategy": "upstream", "updates": []}, [])
    assert core.served_version == 1
    out = coord.tick()
    cleared = [o for o in out if o.topic == topics.secagg_cohort(first.cohort)]
    assert [(o.payload, o.retain) for o in cleared] == [(b"", True)]
    assert first.cohort not in coord.cohorts
    (new,) = [o for o in out if "/secagg/cohort/" in o.topic and o.payload]
    for s in ("site-a", "site-b", "site-c"):
        members[s].on_cohort(b"", first.cohort)  # the cleared announcement
        assert members[s].on_cohort(new.payload)
    second = members["site-a"].pending
    assert second.base_version == 1 and members["site-a"].ready(1) == second

    submit(fed, core, coord, members, "site-a", 1, {k: np.zeros_like(v) for k, v in core.model.items()})
    core.commit(dict(core.model), None, {"strategy": "upstream", "updates": []}, [])
    out = coord.tick()
    assert second.cohort in coord.cohorts and not [o for o in out if o.topic == topics.secagg_cohort(second.cohort)]
