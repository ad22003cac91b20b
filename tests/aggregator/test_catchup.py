"""Catch-up decisions: who is behind, and how often a claim of being behind is answered."""

from __future__ import annotations

from aggregator.catchup import CatchUp, parse_status


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_only_online_sites_behind_on_version_or_epoch_are_answered() -> None:
    clock = Clock()
    c = CatchUp(min_interval_s=10.0, clock=clock)
    assert c.on_status("a", {"state": "online", "version": 3, "epoch": 1}, version=5, epoch=1)
    assert c.on_status("b", {"state": "online", "version": 5, "epoch": 0}, version=5, epoch=1)
    assert not c.on_status("c", {"state": "online", "version": 5, "epoch": 1}, version=5, epoch=1)
    assert not c.on_status("d", {"state": "offline", "version": 0, "epoch": 0}, version=5, epoch=1)
    assert not c.on_status("e", {"state": "online", "version": "3"}, version=5, epoch=1)  # not a number: ignored
    assert not c.on_status("f", {"state": "online", "version": True}, version=5, epoch=1)
    clock.t += 2.0  # the claims have settled
    assert c.due() == ["a", "b"]
    assert c.due() == []


def test_a_storm_of_claims_costs_one_answer_per_interval() -> None:
    clock = Clock()
    c = CatchUp(min_interval_s=10.0, clock=clock)
    c.on_status("a", {"state": "online", "version": 0}, version=2, epoch=0)
    clock.t += 2.0
    assert c.due() == ["a"]
    for _ in range(50):  # a site repeating its claim, another joining in, within the interval
        c.on_status("a", {"state": "online", "version": 0}, version=2, epoch=0)
        c.on_status("b", {"state": "online", "version": 1}, version=2, epoch=0)
        assert c.due() == []
    clock.t += 10.0
    # a's repeats came within the interval after its answer: they wait for the next batch (not dropped: a site
    # whose broker node had no retained chunks needs the release once more, live, see aggregator.catchup)
    assert c.due() == ["a", "b"]
    c.on_status("a", {"state": "online", "version": 0}, version=2, epoch=0)
    clock.t += 5.0
    assert c.due() == []  # one batch per interval, still
    clock.t += 5.0
    assert c.due() == ["a"]


def test_parse_status_ignores_what_is_not_a_document() -> None:
    assert parse_status(b'{"state": "online", "version": 1}') == {"state": "online", "version": 1}
    assert parse_status(b"\xff\xfe") is None
    assert parse_status(b"[1, 2]") is None
    assert parse_status(b"offline") is None


def test_a_site_that_caught_up_before_its_answer_is_not_answered() -> None:
    """Behind for a moment (it was adopting the version just published), then a status at that version: the
    republish it asked for would cost every subscriber the release again for nothing."""
    clock = Clock()
    c = CatchUp(min_interval_s=10.0, clock=clock)
    c.on_status("a", {"state": "online", "version": 0}, version=2, epoch=0)
    clock.t += 2.0
    assert c.due() == ["a"]
    c.on_status("a", {"state": "online", "version": 2}, version=3, epoch=0)  # behind again: pending
    c.on_status("b", {"state": "online", "version": 2}, version=3, epoch=0)
    c.on_status("a", {"state": "online", "version": 3}, version=3, epoch=0)  # caught up before the answer
    clock.t += 10.0
    assert c.due() == ["b"]


def test_a_claim_is_answered_only_once_it_has_stood_the_settle_time() -> None:
    """A site that has just connected says "no key epoch yet" before the retained grant reaches it; the status
    after it withdraws the claim. Answering at once republished the release to every subscriber at each start."""
    clock = Clock()
    c = CatchUp(min_interval_s=10.0, clock=clock, settle_s=2.0)
    assert c.wait_s() == 10.0  # nothing pending: the caller sleeps the interval (a claim wakes it)
    assert c.on_status("a", {"state": "online", "version": 0, "epoch": -1}, version=0, epoch=1)
    assert c.due() == [] and c.wait_s() == 2.0
    clock.t += 0.3
    assert not c.on_status("a", {"state": "online", "version": 0, "epoch": 1}, version=0, epoch=1)  # caught up
    clock.t += 5.0
    assert c.due() == [] and c.wait_s() == 10.0  # withdrawn: no republish
    # a site that stays behind: its repeated claims do not push the answer back, the first one counts
    c.on_status("b", {"state": "online", "version": 0, "epoch": 1}, version=4, epoch=1)
    clock.t += 1.5
    c.on_status("b", {"state": "online", "version": 0, "epoch": 1}, version=4, epoch=1)
    assert c.due() == [] and c.wait_s() == 0.5
    clock.t += 0.5
    assert c.due() == ["b"] and c.wait_s() == 10.0
    c.on_status("d", {"state": "online", "version": 0, "epoch": 1}, version=4, epoch=1)
    clock.t += 2.0
    assert c.due() == [] and c.wait_s() == 8.0  # settled, but one batch per interval still holds
