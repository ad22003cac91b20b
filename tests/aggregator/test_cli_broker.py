"""`fedline aggregator` as a real process against a real Mosquitto: kill -9 mid-buffer, restart, same model.

Also `fedline status` reading the federation from the broker alone.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from aggregator.store import Store
from fedline.testing.patience import bound
from tests.aggregator.helpers import make_federation
from tests.aggregator.test_durability import SITES, STRATEGY, final_verdicts, make_stream, reference_run
from tests.aggregator.test_service_broker import Site, broker_table, read_manifest
from tests.conftest import eventually

ROOT = Path(__file__).resolve().parents[2]


def start(conf: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedline.cli", "aggregator", "--config", str(conf)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


async def test_kill9_mid_buffer_over_mosquitto_then_status(mosquitto, tmp_path):
    fed = make_federation(tmp_path / "fed", SITES)
    conf = fed.write_config(strategy=STRATEGY, broker=broker_table(mosquitto))
    from aggregator.core import AggregatorCore

    probe = AggregatorCore(fed.config(strategy=STRATEGY, state_dir=str(tmp_path / "probe"), name="probe.toml"))
    blobs = make_stream(fed, probe.model)
    probe.close()
    ids = [f"m{i:03d}" for i in range(len(blobs))]  # chunking ids (the update's own msg id is sealed inside)
    log = tmp_path / "aggregator.log"
    proc = start(conf, log)
    try:
        # the aggregator is up (and subscribed) once version 0 is out; its start imports torch: slow when loaded
        await read_manifest(mosquitto, fed, 0, timeout=120)
        async with (
            Site(fed, mosquitto, "site-a") as a,
            Site(fed, mosquitto, "site-b") as b,
            Site(fed, mosquitto, "site-c") as c,
        ):
            sites = {"site-a": a, "site-b": b, "site-c": c}
            order = [SITES[i % 3] for i in range(len(blobs))]

            async def send(i: int) -> None:
                await sites[order[i]].send(blobs[i], ids[i])

            def receipts() -> int:
                """Updates with at least one receipt (a buffered one gets a second, "applied", later)."""
                return len({(r["site"], r["counter"]) for s in sites.values() for r in s.receipts})

            for i in range(5):  # version 1 from three updates (one per site), two more buffered
                await send(i)
                await eventually(lambda: receipts() == i + 1, 60)
            assert [r["verdict"] for r in b.receipts] == ["buffered", "applied", "buffered"]
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            # while it is down, two more updates reach the broker (queued in its persistent session)
            await send(5)
            await send(6)
            proc = start(conf, log)
            await eventually(lambda: receipts() == 7, 60)
            for i in range(7, len(blobs)):
                await send(i)
                await eventually(lambda: receipts() == i + 1, 60)
            v, ref_model, _ref_receipts = reference_run(fed, blobs, tmp_path)

            # the last receipt of every update equals the uninterrupted run's final verdict and version
            # (buffered updates got an "applied" receipt when their buffer flushed, also across the crash)
            def last() -> dict:
                out = {}
                for s_ in sites.values():
                    for r in s_.receipts:
                        out[(r["site"], r["counter"])] = (r["verdict"], r["version"])
                return out

            want = final_verdicts[id(fed)]
            await eventually(lambda: last() == want, 10)
        manifest, weights, _ = await read_manifest(mosquitto, fed, v, timeout=120)
        assert manifest["version"] == v
        for k in ref_model:
            np.testing.assert_array_equal(weights[k], ref_model[k])
        # fedline status, from the broker alone (observer credentials)
        status_conf = tmp_path / "status.toml"
        status_conf.write_text(
            'federation = "test"\nenrollment_file = "fed/enrollment.json"\n'
            + broker_table(mosquitto, "observer").replace('client_id = "agg-test"\n', "")
        )
        out = subprocess.run(
            [sys.executable, "-m", "fedline.cli", "status", "--config", str(status_conf), "--listen", "1"],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert f"model version {v} (key epoch 1, sealed to the members)" in out.stdout
        for s in SITES:
            assert s in out.stdout
        assert "aggregator: online" in out.stdout and "reduce mda" in out.stdout  # K = 3: the default MDA
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(bound(20))
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"aggregator did not stop on SIGTERM; log:\n{log.read_text()}") from None
    assert proc.returncode == 0, log.read_text()
    store = Store(Path(fed.root) / "state" / "aggregator.sqlite")
    assert store.latest_checkpoint().version == v
    store.close()
    _ = asyncio
