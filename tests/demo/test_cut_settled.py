"""The demo's cut site counts as settled only once it is back online after the restore.

Regression: in a short run (the CI's shortened AI4I demo, after the faster DP defaults) site L2 sealed its one update,
was cut 0.8 s later, before its ε (published within 2 s) went out, and the run ended 5 s after the restore with the
site still reconnecting: its figures from before the cut looked settled (outbox 0, the update's receipt in), and the
report gave it ε 0.0.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from broker_bridge.binhead import pack_status
from broker_bridge.observer import Observer
from broker_bridge.topics import Topics
from fedline.demo.watch import CutSchedule

SITE = "L2"


class _Proxy:
    def __init__(self) -> None:
        self.events: list[str] = []

    def cut(self) -> None:
        self.events.append("cut")

    def restore(self) -> None:
        self.events.append("restore")


def _status(topics: Topics, doc: dict[str, Any], binary: bool = False) -> SimpleNamespace:
    payload = pack_status(doc) if binary else json.dumps(doc).encode()
    assert payload is not None
    return SimpleNamespace(topic=topics.status(SITE), payload=payload)


def _update(topics: Topics) -> SimpleNamespace:
    return SimpleNamespace(topic=topics.update_chunk(SITE, "88957f5f9da20c5f", 0), payload=b"sealed")


def test_the_cut_site_is_settled_only_after_an_online_status_since_the_restore() -> None:
    topics = Topics("demo")
    obs = Observer(topics, [SITE], only_sites=True)
    opts = SimpleNamespace(cut_after_version=1, cut_s=3.0)
    state: dict[str, Any] = {"cut": False, "cut_at": None, "restored_at": None}
    proxy = _Proxy()
    cut = CutSchedule(opts, {SITE: proxy}, SITE, state)  # type: ignore[arg-type]
    sv = obs.view.sites[SITE]

    obs.on_message(_status(topics, {"state": "online", "version": 0, "epsilon": 0.0, "outbox_depth": 0}))
    obs.on_message(_update(topics))
    sv.verdicts[1] = {"counter": 1, "msg_id": "88957f5f9da20c5f", "verdict": "buffered"}
    obs.view.model = {"version": 1, "epoch": 1}
    cut.step(obs.view, 10.0)
    assert proxy.events == ["cut"]
    obs.on_message(_status(topics, {"state": "offline", "reason": "connection lost"}))  # the broker's will
    obs.view.model = {"version": 2, "epoch": 1}  # the others made a version without it
    cut.step(obs.view, 13.5)
    assert proxy.events == ["cut", "restore"]

    # the old rule: every update has its verdict and the last figures say outbox 0, so "settled"
    assert not cut.settled(obs.view), "settled before the site said anything since the restore"
    obs.on_message(_status(topics, {"state": "offline", "reason": "connection lost"}))  # a late will: not online
    assert not cut.settled(obs.view)

    obs.on_message(_status(topics, {"state": "online", "version": 2, "epsilon": 1.962806, "outbox_depth": 0}, True))
    assert cut.settled(obs.view)
    assert state["settled"]["counter"] == 1
    assert sv.status["epsilon"] > 0
