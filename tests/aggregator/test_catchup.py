"""Catch-up decisions: who is behind, and how often a claim of being behind is answered."""

from __future__ import annotations

from aggregator.catchup import CatchUp, parse_status


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_only_online_sites_behind_on_version_or_epoch_are_answered() -> None:
    c = CatchUp(min_interval_s=10.0, clock=Clock())
    assert c.on_status("a", {"state": "online", "version": 3, "epoch": 1}, version=5, epoch=1)
    assert c.on_status("b", {"state": "online", "version": 5, "epoch": 0}, version=5, epoch=1)
    assert not c.on_status("c", {"state": "online", "version": 5, "epoch": 1}, version=5, epoch=1)
    assert not c.on_status("d", {"state": "offline", "version": 0, "epoch": 0}, version=5, epoch=1)
    assert not c.on_status("e", {"state": "online", "version": "3"}, version=5, epoch=1)  # not a number: ignored
    assert not c.on_status("f", {"state": "online", "version": True}, version=5, epoch=1)
    assert c.due() == ["a", "b"]
    assert c.due() == []


def test_a_storm_of_claims_costs_one_answer_per_interval() -> None:
    clock = Clock()
    c = CatchUp(min_interval_s=10.0, clock=clock)
    c.on_status("a", {"state": "online", "version": 0}, version=2, epoch=0)
    assert c.due() == ["a"]
    for _ in range(50):  # a site repeating its claim, another joining in, within the interval
        c.on_status("a", {"state": "online", "version": 0}, version=2, epoch=0)
        c.on_status("b", {"state": "online", "version": 1}, version=2, epoch=0)
        assert c.due() == []
    clock.t += 10.0
    assert c.due() == ["b"]  # a was answered 10 s ago but its repeats came before its interval was over
    c.on_status("a", {"state": "online", "version": 0}, version=2, epoch=0)
    clock.t += 10.0
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
    assert c.due() == ["a"]
    c.on_status("a", {"state": "online", "version": 2}, version=3, epoch=0)  # behind again: pending
    c.on_status("b", {"state": "online", "version": 2}, version=3, epoch=0)
    c.on_status("a", {"state": "online", "version": 3}, version=3, epoch=0)  # caught up before the answer
    clock.t += 10.0
    assert c.due() == ["b"]
