"""A pruned checkpoint's file takes the next version's weights (overwritten in its cached pages, not a new file).

What must hold: every kept checkpoint reads back as the weights its version committed; a file a row names is
never overwritten (only one pruned by a committed transaction is); and a process killed with SIGKILL while
committing versions leaves a store whose newest checkpoint is whole and is the newest version committed.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from aggregator.store import Store
from broker_bridge import envelope
from fedline.testing.patience import bound

N = 250_000  # 1 MB of float32 weights per version


def weights(version: int) -> dict[str, np.ndarray]:
    return {"w": np.full(N, float(version), np.float32), "b": np.arange(3, dtype=np.float32) + version}


def commit(store: Store, version: int, keep: int = 2) -> None:
    store.commit_version(version, envelope.tensor_parts(weights(version)), None, {"updates": []}, [], keep=keep)


def read(store: Store, version: int) -> dict[str, np.ndarray] | None:
    ck = store.checkpoint(version)
    return envelope.decode_tensors(ck.weights) if ck is not None and ck.weights else None


def test_a_pruned_checkpoint_file_takes_the_next_version_and_every_kept_one_reads_back(tmp_path) -> None:
    store = Store(tmp_path / "agg.sqlite")
    for v in range(6):
        commit(store, v)
        assert store.kept_checkpoints() == list(range(max(0, v - 1), v + 1))
        for kept in store.kept_checkpoints():
            got = read(store, kept)
            assert got is not None and all(np.array_equal(got[k], x) for k, x in weights(kept).items())
    # versions 0..3 were pruned: their files are gone or became a later version's; one spare at most remains
    names = sorted(p.name for p in store.blob_dir.iterdir())
    assert names == ["model-3.weights", "model-4.weights", "model-5.weights"], names
    assert not (store.blob_dir / "model-3.weights").samefile(store.blob_dir / "model-5.weights")
    store.close()
    # a restart drops the spare (no row names it) and the next commit writes a new file
    store = Store(tmp_path / "agg.sqlite")
    assert sorted(p.name for p in store.blob_dir.iterdir()) == ["model-4.weights", "model-5.weights"]
    commit(store, 6)
    got = read(store, 6)
    assert got is not None and np.array_equal(got["w"], weights(6)["w"])
    store.close()


def test_a_shorter_checkpoint_in_a_reused_file_is_cut_to_its_own_length(tmp_path) -> None:
    store = Store(tmp_path / "agg.sqlite")
    for v in range(3):
        commit(store, v)
    small = {"w": np.full(10, 7.0, np.float32)}
    store.commit_version(3, envelope.tensor_parts(small), None, {"updates": []}, [], keep=2)
    got = read(store, 3)
    assert got is not None and list(got) == ["w"] and np.array_equal(got["w"], small["w"])
    store.close()


CHILD = """
import sys
from aggregator.store import Store
from tests.aggregator.test_checkpoint_reuse import commit
store = Store(sys.argv[1])
latest = store.latest_checkpoint()
v = 0 if latest is None else latest.version + 1
while True:
    commit(store, v)
    print(v, flush=True)
    v += 1
"""


def test_sigkill_while_committing_versions_leaves_the_newest_checkpoint_whole(tmp_path) -> None:
    db = tmp_path / "agg.sqlite"
    for wait in (0.0, 0.13, 0.31):  # killed at different points of the loop
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert proc.stdout is not None
        seen = [int(proc.stdout.readline())]
        while len(seen) < 5:  # at least a few pruned files reused before the kill
            seen.append(int(proc.stdout.readline()))
        time.sleep(wait)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=bound(10))
        store = Store(db)
        newest = store.latest_checkpoint()
        assert newest is not None and newest.version >= seen[-1]  # every version it printed had committed
        for kept in store.kept_checkpoints():
            got = read(store, kept)
            assert got is not None and all(np.array_equal(got[k], x) for k, x in weights(kept).items()), kept
        store.close()
