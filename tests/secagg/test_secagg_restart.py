"""An aggregator restart with cohorts open, on a real AggregatorCore (SQLite on disk) and real members.

The restarted aggregator is a new core and a new coordinator on the same state directory, as after
kill -9 (the in-memory cohort is gone). Each held update must get exactly one final verdict: the
ones of a cohort that died get ``rejected`` / ``secagg_cohort_failed`` receipts; a cohort whose sum
was committed just before the crash is not failed again; the next cohort completes. The same with
a real aggregator process and Mosquitto: tests/secagg/test_secagg_kill9.py.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from aggregator.core import AggregatorCore
from aggregator.secagg_cohort import CohortCoordinator, Outgoing
from broker_bridge.envelope import UpdateHeader
from broker_bridge.federation_key import Keyring
from broker_bridge.topics import Topics
from edge.secagg_member import EdgeCohorts
from tests.aggregator.helpers import make_federation
from tests.secagg.test_secagg_cohort import KEY, SITES, STRATEGY, Clock, announce, receipts, submit

EXTRA = "[secagg]\ngather_s = 0.0\ndeadline_s = 30.0"


def _restart(fed, core: AggregatorCore, clock: Clock) -> tuple[AggregatorCore, CohortCoordinator]:
    core.close()
    core = AggregatorCore(fed.config(strategy=STRATEGY, extra=EXTRA))
    return core, CohortCoordinator(core, Topics("test"), lambda: (1, KEY), clock)


def _finish(coord: CohortCoordinator, members: dict[str, EdgeCohorts], survivors: Outgoing) -> list[Outgoing]:
    """Acks, requests and answers through every member that is asked (the wire encodings, in process)."""
    requests: list[Outgoing] = []
    for s, mem in members.items():
        ack = mem.on_survivors(survivors.payload)
        if ack is not None:
            requests += coord.on_reply(s, ack)
    out: list[Outgoing] = []
    for o in requests:
        site = o.topic.split("/")[-3]
        answer = members[site].on_request(o.payload)
        assert answer is not None
        out += coord.on_reply(site, answer)
    return out


def test_restart_fails_open_cohorts_with_receipts_and_the_next_cohort_completes(tmp_path) -> None:
    fed = make_federation(tmp_path, SITES)
    core = AggregatorCore(fed.config(strategy=STRATEGY, extra=EXTRA))
    clock = Clock()
    topics = Topics("test")
    coord = CohortCoordinator(core, topics, lambda: (1, KEY), clock)
    members = {s: EdgeCohorts(fed.sites[s], fed.enrollment, topics, tmp_path / s, Keyring({1: KEY})) for s in SITES}
    try:
        zeros = {k: np.zeros_like(v) for k, v in core.model.items()}
        first = announce(coord, members, SITES)
        sealed = {}
        for s in ("site-a", "site-b", "site-c"):  # site-d has not submitted yet: the cohort stays open
            header = UpdateHeader(site=s, counter=1, msg_id=f"m1{s}", base_version=0, n_samples=10)
            sealed[s] = members[s].seal(header, zeros)
            coord.on_submission(core.open(sealed[s], s))
        assert core.store.verdict("site-a", 1).verdict == "buffered"

        core, coord = _restart(fed, core, clock)  # kill -9 here: the open cohort is lost with the process
        out = coord.tick()  # no site is online yet (statuses come again after the restart): only the recovery
        got = receipts(out, fed)
        assert {s: (r["verdict"], r["reason"], r["counter"]) for s, r in got.items()} == {
            s: ("rejected", "secagg_cohort_failed", 1) for s in ("site-a", "site-b", "site-c")
        }
        assert "restarted" in got["site-a"]["detail"]
        cleared = {o.topic for o in out if o.retain and o.payload == b""}
        assert cleared == {topics.secagg_cohort(first.cohort), topics.secagg_survivors(first.cohort)}
        assert coord.stats["cohorts_failed"] == 1 and core.store.get_meta("secagg_cohorts_failed") == "1"
        assert coord.tick() == []  # said once

        # the members drop the dead cohort when its announcement is cleared: site-d does not train for it
        for s in SITES:
            members[s].on_cohort(b"", first.cohort)
        assert members["site-d"].pending is None

        # the next cohort: a late resend of a dead cohort's update gets its recorded verdict again
        again = receipts(coord.on_submission(core.open(sealed["site-a"], "site-a")), fed)["site-a"]
        assert (again["verdict"], again["reason"]) == ("rejected", "secagg_cohort_failed")
        second = announce(coord, members, SITES[:3])
        assert second.cohort != first.cohort
        rng = np.random.default_rng(1)
        deltas = {
            s: {k: (rng.standard_normal(v.shape) * 0.01).astype(np.float32) for k, v in core.model.items()}
            for s in SITES[:3]
        }
        base = {k: v.astype(np.float64) for k, v in core.model.items()}
        for s in SITES[:3]:
            submit(fed, core, coord, members, s, 2, deltas[s])
        [survivors] = coord.tick()  # every member submitted: the survivors at once
        done = _finish(coord, {s: members[s] for s in SITES[:3]}, survivors)
        assert core.version == 1
        assert {s: (r["verdict"], r["counter"]) for s, r in receipts(done, fed).items()} == {
            s: ("applied", 2) for s in SITES[:3]
        }
        # x1 = x0 + (1/3) sum of the second cohort's deltas: nothing of the dead cohort is in it
        for k in base:
            expected = base[k] + sum(deltas[s][k].astype(np.float64) for s in SITES[:3]) / 3
            assert np.abs(core.model[k] - expected).max() < 1e-6
        assert core.lineage(1)["cohort"] == second.cohort
        assert {(v.site, v.counter): v.verdict for v in core.store.verdicts()} == {
            ("site-a", 1): "rejected",
            ("site-b", 1): "rejected",
            ("site-c", 1): "rejected",
            ("site-a", 2): "applied",
            ("site-b", 2): "applied",
            ("site-c", 2): "applied",
        }
        assert json.loads(core.store.get_meta("secagg_open")) == []
    finally:
        core.close()
        for mem in members.values():
            mem.close()


def test_restart_in_the_unmask_round_fails_it_and_a_cohort_committed_before_the_crash_stays_applied(tmp_path) -> None:
    fed = make_federation(tmp_path, SITES)
    core = AggregatorCore(fed.config(strategy=STRATEGY, extra=EXTRA))
    clock = Clock()
    topics = Topics("test")
    coord = CohortCoordinator(core, topics, lambda: (1, KEY), clock)
    members = {s: EdgeCohorts(fed.sites[s], fed.enrollment, topics, tmp_path / s, Keyring({1: KEY})) for s in SITES}
    try:
        zeros = {k: np.zeros_like(v) for k, v in core.model.items()}
        # cohort 1 completes; the crash comes after its commit and before it left the open list
        one = announce(coord, members, SITES[:3])
        for s in SITES[:3]:
            submit(fed, core, coord, members, s, 1, zeros)
        [survivors] = coord.tick()
        _finish(coord, {s: members[s] for s in SITES[:3]}, survivors)
        assert core.version == 1
        # cohort 2 reaches the unmask round: survivors announced, acks in, one answer in
        two = announce(coord, members, SITES)
        for s in SITES[:3]:
            submit(fed, core, coord, members, s, 2, zeros)
        clock.now = two.deadline + 1
        [survivors] = coord.tick()
        acks = {s: members[s].on_survivors(survivors.payload) for s in SITES[:3]}
        requests: list[Outgoing] = []
        for s in SITES[:3]:
            requests += coord.on_reply(s, acks[s])
        site = requests[0].topic.split("/")[-3]
        assert coord.on_reply(site, members[site].on_request(requests[0].payload)) == []  # not enough yet
        core.store.set_meta("secagg_open", json.dumps(sorted([one.cohort, two.cohort])))  # the crash window

        core, coord = _restart(fed, core, clock)
        got = receipts(coord.tick(), fed)
        assert {s: (r["verdict"], r["counter"]) for s, r in got.items()} == {s: ("rejected", 2) for s in SITES[:3]}
        assert core.version == 1 and core.store.verdict("site-a", 1).verdict == "applied"  # not failed again
        assert coord.stats["cohorts_failed"] == 1  # cohort 2 only: cohort 1 is in version 1's lineage
    finally:
        core.close()
        for mem in members.values():
            mem.close()


async def test_an_edge_trains_for_a_cohort_announced_after_its_version_and_drops_a_cleared_one(tmp_path) -> None:
    """Regression: a cohort announced after the site adopted the cohort's base version must start a round
    (with ``on_new_model`` the version's own trigger was already spent; the demo stalled on this), and a
    cleared announcement of a cohort the site has not masked in drops it (no round for a dead cohort)."""
    from broker_bridge.federation_key import seal_grant, seal_notice
    from broker_bridge.secagg import messages as msgs
    from edge.agent import EdgeAgent
    from edge.config import load_edge_config
    from tests.edge.helpers import Federation, write_csv, write_site
    from tests.secagg.helpers import announcement

    sites = ["site-a", "site-b", "site-c"]
    fed = Federation.create(tmp_path, sites)
    csv = write_csv(tmp_path / "rows.csv", 50)
    path = write_site(
        fed,
        "site-a",
        csv,
        "mqtt://127.0.0.1:1",  # never connected: the handlers are called directly
        None,
        training={"every_rows": 1_000_000, "on_new_model": True},
        extra={"secure_aggregation": True},
    )
    agent = EdgeAgent(load_edge_config(path))
    try:
        ann = dataclasses.replace(announcement(tuple(sites)), base_version=0)  # the version the site holds
        blob = seal_notice(msgs.sign_cohort(ann, fed.aggregator), 1, KEY)  # as the aggregator publishes it
        assert agent.new_rows == 0 and not agent.state.rebased  # no new rows: only a reason to train starts a round
        # retained messages come in any order: the announcement before the site's key grant waits for it
        await agent.cohort_link.on_message("secagg_cohort", blob, ann.cohort)
        assert agent.cohorts is not None and agent.cohorts.ready(0) is None and not agent.state.wake_train.is_set()
        grant = seal_grant(fed.enrollment.federation, agent.keys.public(), 1, KEY, fed.aggregator)
        await agent.on_grant(grant)
        assert agent.state.rebased and agent.state.wake_train.is_set()
        assert agent.cohorts is not None and agent.cohorts.ready(0) is not None
        await agent.cohort_link.on_message("secagg_cohort", b"", ann.cohort)  # the aggregator cleared it (it ended)
        assert agent.cohorts.ready(0) is None
    finally:
        agent.close()
