"""FedAsync's per-site rate survives kill -9 of the real aggregator process, over a real Mosquitto.

The in-process check (the core reopened over its store) is tests/aggregator/test_site_rate.py; this is
the same claim for the process an operator runs: ``fedline aggregator`` killed with SIGKILL right after
it applied a site's update, restarted from its state directory, gives that site's next update
α × (seconds since) / site_interval_s, not a fresh full α.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from aggregator.config import load_config
from fedline.launch import Launcher
from tests.aggregator.helpers import make_federation, random_delta
from tests.aggregator.test_service_broker import broker_table
from tests.conftest import eventually
from tests.parties import Party


@pytest.mark.slow
@pytest.mark.broker
async def test_kill9_of_the_aggregator_does_not_reset_a_sites_rate(mosquitto, tmp_path) -> None:
    from models import build_model, shared_state

    fed = make_federation(tmp_path / "fed", ["site-a"])
    path = fed.write_config(
        strategy='kind = "fedasync"\nalpha = 0.5\nstaleness = "constant"\nsite_interval_s = 3600',
        broker=broker_table(mosquitto),
    )
    spec = load_config(path).model
    shapes = shared_state(build_model(spec, seed=7), spec)
    launcher = Launcher(tmp_path / "logs", cwd=fed.root)
    rng = np.random.default_rng(3)
    agg = launcher.start("aggregator", ["aggregator", "--config", str(path)])
    try:
        async with Party(mosquitto, "site-a", fed.agg.public().sign_pub, "test", keys=fed.sites["site-a"]) as site:
            await eventually(lambda: bool(agg.since_start("aggregator.started")), 60)
            blob, h = fed.seal("site-a", random_delta(shapes, rng, 0.1), 0)
            await site.send(blob, h.msg_id)
            await eventually(lambda: site.receipt(h.counter), 30)
            first = site.receipt(h.counter)
            assert (first["verdict"], first["weight"]) == ("applied", pytest.approx(0.5))
            t_applied = time.time()  # no earlier than the verdict's decided_at

            agg.kill9()
            agg = launcher.restart(agg)
            await eventually(lambda: bool(agg.since_start("aggregator.started")), 60)
            blob, h = fed.seal("site-a", random_delta(shapes, rng, 0.1), 1)
            await site.send(blob, h.msg_id)
            await eventually(lambda: site.receipt(h.counter), 30)
            after = time.time()
            second = site.receipt(h.counter)
            assert second["verdict"] == "applied" and second["version"] == 2
            # α × (seconds since the first was applied) / 3600: the seconds are at most those the test saw
            # (plus the first receipt's way back), never a fresh 3600
            assert 0 < second["weight"] <= 0.5 * (after - t_applied + 5.0) / 3600
    finally:
        await asyncio.to_thread(launcher.stop_all)
