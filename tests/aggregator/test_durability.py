"""kill -9 at any point, restart: same version, same buffer, no double counting."""

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
from tests.aggregator.helpers import make_federation, random_delta

ROOT = Path(__file__).resolve().parents[2]
SITES = ["site-a", "site-b", "site-c"]
STRATEGY = (
    'kind = "fedbuff"\nbuffer_size = 3\nstaleness = "hinge"\na = 1.0\nb = 1.0\nserver_lr = 0.8\nserver_momentum = 0.5'
)


def make_stream(fed, reference, n: int = 14) -> list[bytes]:
    """Updates whose base lags the live version the way real sites do (every 4th update makes a version)."""
    rng = np.random.default_rng(5)
    out = []
    for i in range(n):
        base = max(0, i // 4 - (i % 3))  # some fresh, some one or two versions stale
        blob, _ = fed.seal(SITES[i % 3], random_delta(reference, rng, 0.05), base_version=base, n_samples=5 + 3 * i)
        out.append(blob)
    return out


def reference_run(fed, blobs, tmp: Path) -> tuple[int, dict[str, np.ndarray], list[dict]]:
    """An uninterrupted run: (version, model, receipts at submit time); ``final_verdicts`` stores the rest."""
    core = AggregatorCore(fed.config(strategy=STRATEGY, state_dir=str(tmp / "ref-state"), name="ref.toml"))
    receipts = [core.submit(b) for b in blobs]
    out = core.version, {k: v.copy() for k, v in core.model.items()}, receipts
    final_verdicts[id(fed)] = {(v.site, v.counter): (v.verdict, v.version) for v in core.store.verdicts()}
    core.close()
    return out


final_verdicts: dict[int, dict] = {}


def test_crash_mid_buffer_in_process_restart_resumes_same_state(tmp_path):
    fed = make_federation(tmp_path / "fed", SITES)
    cfg = fed.config(strategy=STRATEGY)
    core = AggregatorCore(cfg)
    blobs = make_stream(fed, core.model)
    for b in blobs[:5]:  # version 1 made from 3 (one per site), then 2 in the buffer
        core.submit(b)
    assert (core.version, len(core.buffer)) == (1, 2)
    model, momentum = {k: v.copy() for k, v in core.model.items()}, {k: v.copy() for k, v in core.momentum.items()}
    # no close(): the process "dies"; a new core on the same state dir picks up
    again = AggregatorCore(cfg)
    assert (again.version, len(again.buffer)) == (1, 2)
    assert [(u.site, u.counter, u.weight) for u in again.buffer] == [(u.site, u.counter, u.weight) for u in core.buffer]
    for k in model:
        np.testing.assert_array_equal(again.model[k], model[k])
        np.testing.assert_array_equal(again.momentum[k], momentum[k])
    for b in blobs[5:]:
        again.submit(b)
    v, ref_model, _ = reference_run(fed, blobs, tmp_path)
    assert again.version == v
    for k in ref_model:
        np.testing.assert_array_equal(again.model[k], ref_model[k])
    again.close()


@pytest.mark.parametrize("kill_after", [2, 5, 9])
def test_kill9_anywhere_then_resend_everything_equals_uninterrupted(tmp_path, kill_after):
    """A real process is SIGKILLed after ``kill_after`` receipts (maybe mid-commit of the next one).

    Sites resend whatever had no receipt (here: everything, which also resends
    decided ones): the final model equals an uninterrupted run's, bit for bit.
    """
    fed = make_federation(tmp_path / "fed", SITES)
    conf = fed.write_config(strategy=STRATEGY)
    blob_dir = tmp_path / "blobs"
    blob_dir.mkdir()
    seed_core = AggregatorCore(fed.config(strategy=STRATEGY, state_dir=str(tmp_path / "probe"), name="probe.toml"))
    blobs = make_stream(fed, seed_core.model)
    seed_core.close()
    for i, b in enumerate(blobs):
        (blob_dir / f"{i:03d}.bin").write_bytes(b)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "tests.aggregator.crash_child", str(conf), str(blob_dir)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=ROOT, env=env, text=True)
    seen = 0
    for line in child.stdout:
        if "verdict" in json.loads(line):
            seen += 1
            if seen == kill_after:
                child.send_signal(signal.SIGKILL)
                break
    child.wait()
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    rerun = subprocess.run(cmd, capture_output=True, cwd=ROOT, env=env, text=True, check=True)
    lines = [json.loads(x) for x in rerun.stdout.splitlines()]
    assert lines[0]["ready"] >= 0
    v, ref_model, ref_receipts = reference_run(fed, blobs, tmp_path)
    # the rerun's receipts equal the uninterrupted ones (duplicates answered from the store)
    got = lines[1:]
    for g, r in zip(got, ref_receipts):
        assert (g["site"], g["counter"]) == (r["site"], r["counter"])
        if r["verdict"] == "applied":
            assert g["verdict"] == "applied" and g["version"] == r["version"]
    from aggregator.store import Store

    store = Store(Path(fed.root) / "state" / "aggregator.sqlite")
    ck = store.latest_checkpoint()
    assert ck.version == v
    model = envelope.decode_tensors(ck.weights)
    for k in ref_model:
        np.testing.assert_array_equal(model[k], ref_model[k])
    counts = store.verdict_counts()
    assert counts.get("applied", 0) + counts.get("buffered", 0) == sum(
        1 for r in ref_receipts if r["verdict"] in ("applied", "buffered")
    )
    applied_versions = [ck.version for ck in [store.checkpoint(x) for x in range(1, v + 1)]]
    assert applied_versions == list(range(1, v + 1))
    # lineage: every accepted update is in exactly one version
    seen_ids = [(u["site"], u["counter"]) for x in range(1, v + 1) for u in store.checkpoint(x).lineage["updates"]]
    assert len(seen_ids) == len(set(seen_ids))
    store.close()


def test_old_verdicts_are_pruned_per_site_and_recent_duplicates_still_get_theirs(tmp_path):
    """The store keeps each site's newest keep_verdicts counters, not every update ever sent."""
    from tests.aggregator.helpers import SPEC_TOML

    fed = make_federation(tmp_path / "fed", ["site-a", "site-b"])
    core = AggregatorCore(fed.config(strategy='kind = "fedavg"', spec=f"keep_verdicts = 10\n{SPEC_TOML}"))
    rng = np.random.default_rng(3)
    sent: dict[int, bytes] = {}
    for _ in range(30):  # FedAvg over two sites: one version per pair of updates
        v = core.version
        sent[len(sent) + 1], _ = fed.seal("site-a", random_delta(core.model, rng), base_version=v)
        assert core.submit(sent[len(sent)])["verdict"] == "buffered"
        assert core.submit(fed.seal("site-b", random_delta(core.model, rng), base_version=v)[0])["verdict"] == "applied"
    assert core.version == 30
    for site in ("site-a", "site-b"):
        kept = sorted(c for (s, c) in ((v.site, v.counter) for v in core.store.verdicts()) if s == site)
        assert kept == list(range(21, 31)), (site, kept)  # 30 - 10 and below are gone
        assert core.store.max_counter(site) == 30  # replay protection still knows the newest
    again = core.submit(sent[25])  # a resent duplicate within the window: its original verdict
    assert (again["verdict"], again["version"]) == ("applied", 25)
    old = core.submit(sent[5])  # older than any outbox holds: refused, never counted twice
    assert (old["verdict"], old["reason"]) == ("rejected", "replay")
    assert core.version == 30
    core.close()
