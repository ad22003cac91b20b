"""The site history commits with the verdict it goes with: one transaction, both or neither, never counted twice.

``aggregator.recovery`` notes each update's release in the transaction of its decision
(``Store.with_next_transaction``). A failed commit leaves neither the verdict nor the note; the
note stays pending and the resent update's decision commits it once. kill -9 at any point, then a
resend of everything: each release is counted exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aggregator.core import AggregatorCore
from broker_bridge import envelope
from broker_bridge.envelope import UpdateHeader
from fedline.testing.patience import bound
from tests.aggregator.helpers import make_federation, random_delta

ROOT = Path(__file__).resolve().parents[2]
SITES = ["site-a", "site-b"]
STRATEGY = 'kind = "fedbuff"\nbuffer_size = 2\nmax_staleness = 100'
DP = {"mode": "dp-sgd", "sample_rate": 0.1, "noise_multiplier": 1.2, "steps": 30}


def seal(fed, site: str, counter: int, delta, eps: float) -> bytes:
    header = UpdateHeader(site, counter, f"m{counter}", 0, 10, {**DP, "epsilon": eps})
    return envelope.seal_update(header, delta, fed.sites[site], fed.agg.public().box_pub)


class FailingCommit:
    """The store's connection, whose next COMMIT fails (a full disk, say) and is rolled back."""

    def __init__(self, db) -> None:
        self.db, self.armed = db, True

    def execute(self, sql: str, *args):
        if sql == "COMMIT" and self.armed:
            self.armed = False
            raise OSError("disk full (injected)")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self.db, name)


def test_a_failed_commit_leaves_neither_verdict_nor_note_and_the_resend_is_counted_once(tmp_path):
    fed = make_federation(tmp_path, SITES)
    core = AggregatorCore(fed.config(strategy=STRATEGY))
    try:
        rng = np.random.default_rng(1)
        core.submit(seal(fed, "site-a", 1, random_delta(core.model, rng), 0.5))
        blob = seal(fed, "site-a", 2, random_delta(core.model, rng), 0.75)
        core.store._db = FailingCommit(core.store._db)
        with pytest.raises(OSError):
            core.submit(blob)
        assert core.store.verdict("site-a", 2) is None
        answer = core.history.answer("site-a", "n", core.store.max_counter("site-a"))
        assert (answer.last_counter, answer.releases, answer.epsilon) == (1, 1, 0.5)  # not noted either
        assert core.submit(blob)["verdict"] == "buffered"  # the site resends: decided and noted, once
        answer = core.history.answer("site-a", "n", core.store.max_counter("site-a"))
        assert (answer.last_counter, answer.releases, answer.epsilon) == (2, 2, 0.75)
        assert answer.history == [(0.1, 1.2, 30, 1, 2)]
        core.submit(blob)  # a duplicate: its first verdict again, no new release
        assert core.history.answer("site-a", "n", None).releases == 2
    finally:
        core.close()


@pytest.mark.parametrize("kill_after", [1, 3, 5])
def test_kill9_then_resend_everything_counts_each_release_once(tmp_path, kill_after):
    """A real process is SIGKILLed after ``kill_after`` receipts (perhaps inside the next decision's
    transaction); a restarted one takes every update again: 3 releases per site, each once."""
    fed = make_federation(tmp_path / "fed", SITES)
    conf = fed.write_config(strategy=STRATEGY)
    core = AggregatorCore(fed.config(strategy=STRATEGY))  # seeds version 0: the child starts without torch
    rng = np.random.default_rng(2)
    blob_dir = tmp_path / "blobs"
    blob_dir.mkdir()
    for i in range(6):
        site, counter = SITES[i % 2], 1 + i // 2
        (blob_dir / f"{i:03d}.bin").write_bytes(seal(fed, site, counter, random_delta(core.model, rng), 0.25 * counter))
    core.close()
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "tests.aggregator.crash_child", str(conf), str(blob_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    assert proc.stdout is not None
    seen = 0
    for line in proc.stdout:
        if "verdict" in json.loads(line):
            seen += 1
            if seen == kill_after:
                os.kill(proc.pid, signal.SIGKILL)
                break
    proc.wait(timeout=bound(30))
    again = AggregatorCore(fed.config(strategy=STRATEGY))
    try:
        for path in sorted(blob_dir.glob("*.bin")):
            assert again.submit(path.read_bytes())["verdict"] in ("applied", "buffered")
        for site in SITES:
            answer = again.history.answer(site, "n", again.store.max_counter(site))
            assert (answer.last_counter, answer.releases, answer.epsilon) == (3, 3, 0.75)
            assert answer.history == [(0.1, 1.2, 30, 1, 3)]
        assert again.version == 3  # six updates, K = 2: each reduced once
    finally:
        again.close()
