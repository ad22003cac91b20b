"""Soak: several sites for a while, each site's link randomly reset or black-holed again and again.

Clocks disagree as well (one site 7 minutes ahead, one 5 minutes behind, the
aggregator 2 minutes behind). At the end the ledger must be exact, nothing
refused, and the memory of every process flat:
RSS is read (psutil) once every process is warm (each site has sealed an
update, so torch, Opacus and the first ONNX export are loaded) and again at
the end. The default run has a short variant (3 sites, 20 s of plant data, ~35 s in all);
``pytest -m slow`` runs ten sites for about five minutes.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from fedline.testing.rig import FaultRig, RigSettings
from tests.faults.conftest import record

MiB = 1024 * 1024


async def _soak(tmp_path, n_sites: int, seconds: float, seed: int, name: str) -> None:
    rate = 8.0
    settings = RigSettings(
        rows_per_site=int(rate * seconds),
        rate_hz=rate,
        every_rows=40,
        buffer_size=max(2, n_sites // 2),
        max_staleness=8,
        resend_after_s=10.0,
    )
    sites = [f"site-{i:02d}" for i in range(n_sites)]
    rng = random.Random(seed)
    async with FaultRig(tmp_path, sites, settings) as rig:
        # clocks disagree too: one site 7 min ahead, one 5 min behind, the aggregator 2 min behind
        skew = {sites[0]: 420.0, sites[1]: -300.0}
        rig.start_aggregator(clock_offset_s=-120.0)
        for site in sites:
            rig.start_site(site, clock_offset_s=skew.get(site, 0.0))
        t0 = time.monotonic()
        await rig.until(lambda: all(rig.ledger(s) for s in sites), 60 + 10 * n_sites, "every site warm")
        rss_start = {n: p.rss() for n, p in rig.procs.items()}
        cuts = {"cut": 0, "blackhole": 0}
        down_s = 0.0
        while not rig.replay_ended():
            rig.check_alive()
            await asyncio.sleep(rng.uniform(1.0, 4.0))
            site = rng.choice(sites)
            mode = rng.choice(["cut", "cut", "blackhole"])
            proxy = rig.proxies[site]
            proxy.cut() if mode == "cut" else proxy.blackhole()
            cuts[mode] += 1
            d = rng.uniform(0.5, 5.0)
            down_s += d
            await asyncio.sleep(d)
            proxy.restore()
        await rig.until(rig.settled, 120 + 10 * n_sites, "every sealed update settled")
        rss_end = {n: p.rss() for n, p in rig.procs.items()}
        rep = rig.reconcile()
        drift = {n: round((rss_end[n] - rss_start[n]) / MiB, 1) for n in rss_start}
        record(
            name,
            **rep.figures(),
            sites=n_sites,
            clock_skew_s={**skew, "aggregator": -120.0},
            run_s=round(time.monotonic() - t0, 1),
            disconnects=cuts,
            disconnected_s=round(down_s, 1),
            redeliveries_absorbed=rig.redeliveries(),
            rss_start_mib={n: round(v / MiB, 1) for n, v in rss_start.items()},
            rss_drift_mib=drift,
        )
        assert rep.exact, rep.problems()
        assert rep.rejected == 0 and rep.dropped_by_policy == 0
        for n in rss_start:  # flat: a few MiB of allocator noise, no growth with the run's length
            assert rss_end[n] <= rss_start[n] * 1.10 + 16 * MiB, (
                f"{n}: RSS {rss_start[n] / MiB:.0f} -> {rss_end[n] / MiB:.0f} MiB"
            )


async def test_soak_short_three_sites_random_disconnects(tmp_path) -> None:
    await _soak(tmp_path, 3, 12.0, seed=1, name="soak_short")


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_soak_ten_sites_five_minutes_random_disconnects(tmp_path) -> None:
    await _soak(tmp_path, 10, 300.0, seed=2, name="soak_long")
