"""Group commit (``AggregatorCore.decide_many``, ``Store.grouped``): several decisions, one transaction.

Receipts come only after the commit; a failed commit keeps nothing of the group (memory reloaded
from the store); kill -9 between the decisions and their commit loses no update and counts none
twice once the sites resend.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from aggregator.core import AggregatorCore
from aggregator.store import Store
from broker_bridge import envelope
from broker_bridge.envelope import UpdateHeader
from fedline.testing.patience import bound
from tests.aggregator.helpers import make_federation, random_delta
from tests.aggregator.test_history_commit import FailingCommit

ROOT = Path(__file__).resolve().parents[2]
SITES = ["site-a", "site-b", "site-c"]
STRATEGY = 'kind = "fedbuff"\nbuffer_size = 3\nmax_staleness = 100\nserver_momentum = 0.5'
DP = {"mode": "dp-sgd", "sample_rate": 0.1, "noise_multiplier": 1.2, "steps": 30, "epsilon": 0.5}


def stream(fed, reference, n: int = 9) -> list[bytes]:
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        site, counter = SITES[i % 3], 1 + i // 3
        header = UpdateHeader(site, counter, f"m{i}", i // 3, 5 + i, dict(DP))
        out.append(
            envelope.seal_update(header, random_delta(reference, rng, 0.05), fed.sites[site], fed.agg.public().box_pub)
        )
    return out


def uninterrupted(fed, blobs, tmp: Path) -> tuple[int, dict[str, np.ndarray]]:
    core = AggregatorCore(fed.config(strategy=STRATEGY, state_dir=str(tmp / "ref"), name="ref.toml"))
    for b in blobs:
        core.submit(b)
    out = core.version, {k: v.copy() for k, v in core.model.items()}
    core.close()
    return out


def finishes_as_uninterrupted(core: AggregatorCore, fed, blobs: list[bytes], tmp: Path, start: int) -> None:
    """The rest of ``blobs`` from ``start`` submitted: version 3 and the uninterrupted run's model, bit for bit."""
    for b in blobs[start:]:
        core.submit(b)
    version, model = uninterrupted(fed, blobs, tmp)
    assert core.version == version == 3
    for k in model:
        np.testing.assert_array_equal(core.model[k], model[k])


def resend_all_equals_uninterrupted(core: AggregatorCore, fed, blobs: list[bytes], tmp: Path) -> None:
    """Every site resends everything: the model is the uninterrupted run's bit for bit, each release counted once."""
    for b in blobs:
        core.submit(b)
    version, model = uninterrupted(fed, blobs, tmp)
    assert core.version == version == 3
    for k in model:
        np.testing.assert_array_equal(core.model[k], model[k])
    for site in SITES:
        assert core.history.answer(site, "n", None).releases == 3


def test_a_group_decides_as_one_at_a_time_and_is_durable_when_it_returns(tmp_path):
    fed = make_federation(tmp_path, SITES)
    core = AggregatorCore(fed.config(strategy=STRATEGY))
    try:
        blobs = stream(fed, core.model)
        ops = [core.open(b) for b in blobs[:5]]  # a full buffer (a reduce inside the group) and two more
        decisions = core.decide_many(ops)
        assert [d.receipt["verdict"] for d in decisions] == ["buffered", "buffered", "applied", "buffered", "buffered"]
        other = Store(core.store.path)  # another connection: what a restart would read
        assert [
            other.verdict(s, c).verdict for s, c in [("site-a", 1), ("site-c", 1), ("site-a", 2), ("site-b", 2)]
        ] == [
            "applied",
            "applied",
            "buffered",
            "buffered",
        ]
        other.close()
        again = core.decide_many([core.open(blobs[3])])  # a resend: its first verdict
        assert again[0].duplicate and again[0].receipt["verdict"] == "buffered"
        finishes_as_uninterrupted(core, fed, blobs, tmp_path, 5)
    finally:
        core.close()


def test_a_failed_group_commit_keeps_nothing_of_the_group_and_the_resends_count_once(tmp_path):
    fed = make_federation(tmp_path, SITES)
    core = AggregatorCore(fed.config(strategy=STRATEGY))
    try:
        blobs = stream(fed, core.model)
        core.submit(blobs[0])
        core.store._db = FailingCommit(core.store._db)
        with pytest.raises(OSError):
            core.decide_many([core.open(b) for b in blobs[1:5]])  # its reduce's commit fails (and takes the group)
        assert (core.version, [(u.site, u.counter) for u in core.buffer]) == (0, [("site-a", 1)])
        assert core.store.verdict("site-b", 1) is None and core.store.verdict("site-b", 2) is None
        assert core.history.answer("site-b", "n", None).releases == 0
        resend_all_equals_uninterrupted(core, fed, blobs, tmp_path)  # site-a's first is a duplicate
    finally:
        core.close()


@pytest.mark.parametrize("pause", [1, 2, 4])
def test_kill9_between_decisions_and_their_commit_then_resend_equals_uninterrupted(tmp_path, pause):
    fed = make_federation(tmp_path / "fed", SITES)
    conf = fed.write_config(strategy=STRATEGY)
    core = AggregatorCore(fed.config(strategy=STRATEGY))  # seeds version 0: the child starts without torch
    blobs = stream(fed, core.model)
    core.close()
    blob_dir = tmp_path / "blobs"
    blob_dir.mkdir()
    for i, b in enumerate(blobs):
        (blob_dir / f"{i:03d}.bin").write_bytes(b)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "tests.aggregator.group_child", str(conf), str(blob_dir), str(pause)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    assert proc.stdout is not None
    receipts = []
    for line in proc.stdout:
        doc = json.loads(line)
        if doc.get("group") == pause:  # decided, not committed: kill it here
            os.kill(proc.pid, signal.SIGKILL)
            break
        if "verdict" in doc:
            receipts.append((doc["site"], doc["counter"], doc["verdict"]))
    proc.wait(timeout=bound(30))
    again = AggregatorCore(fed.config(strategy=STRATEGY))
    try:
        for site, counter, verdict in receipts:  # every receipt sent is durable: the same verdict, or applied since
            assert again.store.verdict(site, counter).verdict in (verdict, "applied")
        extra = {(v.site, v.counter) for v in again.store.verdicts()} - {(s, c) for s, c, _ in receipts}
        # of the killed group only what a reduce inside it committed (group 2 fills the buffer) is durable
        assert all(again.store.verdict(s, c).verdict == "applied" for s, c in extra)
        assert bool(extra) == (pause == 2)
        resend_all_equals_uninterrupted(again, fed, blobs, tmp_path)
    finally:
        again.close()


def test_the_stream_waits_for_the_batches_being_opened_up_to_group_max():
    from collections import deque
    from concurrent.futures import Future

    from aggregator.core import GROUP_MAX, _whole_group

    def batch(tag: str, n: int, done: bool = True) -> tuple[Future, int]:
        fut: Future = Future()
        if done:
            fut.set_result([f"{tag}{i}" for i in range(n)])
        return fut, n

    pending = deque([batch("a", 4), batch("b", 4, done=False), batch("c", 4)])
    opening = pending[1][0]
    timer = threading.Timer(0.05, lambda: opening.set_result([f"b{i}" for i in range(4)]))
    timer.start()  # b is still being opened when the group is taken: the group waits for it (order kept)
    assert _whole_group(pending) == [f"{t}{i}" for t in "abc" for i in range(4)]
    assert not pending
    many = deque(batch(str(k), 4) for k in range(6))
    runs = [_whole_group(many), _whole_group(many)]
    assert [len(r) for r in runs] == [GROUP_MAX, 24 - GROUP_MAX]  # never more than GROUP_MAX in one commit
    assert [x for r in runs for x in r] == [f"{k}{i}" for k in range(6) for i in range(4)]  # arrival order
    left = [f"L{i}" for i in range(13)]  # what a group that ended at its version left: first, then what fits
    more = deque(batch(str(k), 4) for k in range(2))
    assert _whole_group(more, left) == left and len(more) == 2  # 13 + 4 > GROUP_MAX: the batch waits
    assert _whole_group(more, left[:5]) == [*left[:5], "00", "01", "02", "03", "10", "11", "12", "13"]


def test_the_stream_ends_each_group_at_its_version_appends_nothing_and_decides_as_one_by_one(tmp_path):
    """process_stream offers whole groups (up to GROUP_MAX, waiting for the updates being opened) and each group
    commit ends at the update that makes a version (decide_group), the rest starting the next group: every version's
    updates are decided in its own group, so no buffered update's bytes are appended (the groups of 16 before cut
    across versions, and the updates after a group's last version were appended only to be applied in the next).
    Its verdicts and model are those of deciding the updates one by one."""
    from aggregator.core import GROUP_MAX
    from tests.aggregator.test_deferred_append import _counting

    fed = make_federation(tmp_path, SITES)
    ref = AggregatorCore(fed.config(strategy=STRATEGY, state_dir=str(tmp_path / "s0"), name="s0.toml"))
    blobs = stream(fed, ref.model, n=2 * GROUP_MAX + 1)
    one_by_one = [ref.submit(b)["verdict"] for b in blobs]
    core = AggregatorCore(fed.config(strategy=STRATEGY, state_dir=str(tmp_path / "s1"), name="s1.toml"))
    offered: list[int] = []
    decided: list[int] = []
    decide_group = core.decide_group

    def counted(ops):
        offered.append(len(ops))
        out = decide_group(ops)
        decided.append(len(out[0]))
        return out

    core.decide_group = counted  # type: ignore[method-assign]
    appended = _counting(core.store)
    try:
        assert [d.receipt["verdict"] for d in core.process_stream(blobs)] == one_by_one
        assert decided == [3] * 11  # K = 3: each group up to its version
        assert offered[0] == GROUP_MAX and max(offered) == GROUP_MAX  # offered whole groups
        assert appended == []  # no update's bytes written: each went into a version in its own group
        assert core.version == ref.version == (2 * GROUP_MAX + 1) // 3
        for k in ref.model:
            np.testing.assert_array_equal(core.model[k], ref.model[k])
    finally:
        core.close()
        ref.close()


def test_a_group_ends_at_its_version_and_leaves_the_rest_and_a_group_without_one_decides_all(tmp_path):
    fed = make_federation(tmp_path, SITES)
    core = AggregatorCore(fed.config(strategy=STRATEGY))
    try:
        blobs = stream(fed, core.model)
        ops = [core.open(b) for b in blobs[:5]]
        decisions, left = core.decide_group(ops[:2])  # no version: both decided, nothing left
        assert [d.receipt["verdict"] for d in decisions] == ["buffered", "buffered"] and left == []
        decisions, left = core.decide_group(ops[2:])  # the first fills the buffer (K = 3): the group ends there
        assert [d.receipt["verdict"] for d in decisions] == ["applied"] and decisions[0].new_version == 1
        assert left == ops[3:] and core.store.verdict("site-a", 2) is None  # left undecided, nothing of them stored
        decisions, left = core.decide_group([ops[0], *left])  # a resend (a duplicate) and the two left
        assert [d.receipt["verdict"] for d in decisions] == ["applied", "buffered", "buffered"] and left == []
        assert decisions[0].duplicate
        finishes_as_uninterrupted(core, fed, blobs, tmp_path, 5)
    finally:
        core.close()
