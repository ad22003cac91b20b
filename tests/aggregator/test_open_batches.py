"""The pipeline opens updates in batches (``AggregatorCore.process_stream``): the same decisions as one at a time.

Why a test: batching the hand-off to the opening threads changes which updates share a group commit,
never what is decided. Whatever the batch size, the receipts (in input order), the final model (bit for
bit) and the verdicts on disk equal those of deciding each update alone, with a malformed update
counted and refused in its place and a resent duplicate answered with its update's verdict.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from aggregator.core import AggregatorCore
from aggregator.open_batches import OpenBatcher
from aggregator.opener import Opened
from fedline.testing.patience import bound
from tests.aggregator.helpers import make_federation
from tests.aggregator.test_group_commit import STRATEGY, stream


def _inputs(fed, reference) -> list[bytes]:
    blobs = stream(fed, reference, 9)
    garbage = b"FLE\x01" + bytes(200)  # framed like an update, does not decrypt
    return [*blobs[:4], garbage, blobs[4], blobs[1], *blobs[5:]]  # blobs[1] again: a resend


def _one_at_a_time(fed, blobs, tmp):
    core = AggregatorCore(fed.config(strategy=STRATEGY, state_dir=str(tmp / "alone"), name="alone.toml"))
    receipts = [core.submit(b) for b in blobs]
    out = receipts, core.version, {k: v.copy() for k, v in core.model.items()}, core.store.verdict_counts()
    core.close()
    return out


@pytest.mark.parametrize("batch", [1, 3, 4, 16])
def test_batched_opening_decides_as_one_at_a_time(tmp_path, batch):
    fed = make_federation(tmp_path, ["site-a", "site-b", "site-c"])
    core = AggregatorCore(fed.config(strategy=STRATEGY, state_dir=f"b{batch}", name=f"b{batch}.toml"))
    blobs = _inputs(fed, core.model)
    receipts, version, model, counts = _one_at_a_time(fed, blobs, tmp_path)
    got = [d.receipt for d in core.process_stream(blobs, batch=batch)]
    assert [r["verdict"] for r in got] == [r["verdict"] for r in receipts]
    assert got[4]["verdict"] == "rejected" and got[4]["reason"] == "decrypt"  # the malformed one, in its place
    assert (got[6]["site"], got[6]["counter"]) == (got[1]["site"], got[1]["counter"])  # the resend: answered
    assert got[6] == receipts[6]  # with the verdict its update holds now, as when decided alone
    assert [(r["site"], r["counter"], r["version"]) for r in got] == [
        (r["site"], r["counter"], r["version"]) for r in receipts
    ]
    assert core.version == version == 3
    for k in model:
        np.testing.assert_array_equal(core.model[k], model[k])
    assert core.store.verdict_counts() == counts == {"applied": 9}
    assert core.metrics.value("fedline_aggregator_rejections_total", {"reason": "decrypt"}) == 1
    core.close()


def test_the_service_hands_over_at_once_when_a_thread_is_free_and_in_batches_while_all_are_busy():
    """``OpenBatcher``: one future per update, results in each update's own future, a failure in its own."""

    async def run() -> None:
        gate = threading.Event()
        seen: list[str] = []

        def opening(name: str) -> Opened:
            if name == "first":
                assert gate.wait(bound(10))  # holds the only thread until the others have arrived
            if name == "bad":
                raise RuntimeError("a bug while opening")
            seen.append(name)
            return Opened(b"", msg_id=name)

        with ThreadPoolExecutor(1) as pool:
            batcher = OpenBatcher(pool, workers=1, batch_max=4)
            first = batcher.open(opening, "first")  # the thread is free: handed over at once
            rest = [batcher.open(opening, n) for n in ("a", "bad", "b", "c", "d", "e")]
            assert batcher.tasks == 1  # the others wait while the one thread is busy
            gate.set()
            assert (await first).msg_id == "first"
            assert (await rest[0]).msg_id == "a"
            with pytest.raises(RuntimeError, match="a bug"):
                await rest[1]
            assert [(await f).msg_id for f in rest[2:]] == ["b", "c", "d", "e"]
            assert batcher.tasks == 3  # first alone, then a..c (four), then d..e
            assert seen == ["first", "a", "b", "c", "d", "e"]  # in arrival order

    asyncio.run(run())
