"""bench/scale.py stays runnable: a few real sites, a real Mosquitto and `fedline aggregator`, a few seconds."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "scale.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_scale", BENCH)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["bench_scale"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.broker
def test_scale_bench_runs_a_small_federation_to_a_drained_backlog(capsys) -> None:
    bench = _load()
    assert bench.buffer_size_for(1000) == 100 and bench.buffer_size_for(4) == 1
    assert (
        bench.main(
            [
                "--json",
                "--sites",
                "4",
                "--params",
                "2000",
                "--minutes",
                "0.1",
                "--rate-per-site",
                "1",
                "--step-s",
                "2",
                "--max-steps",
                "1",
                "--procs",
                "2",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    for key in (
        "sites",
        "params",
        "updates_per_s",
        "receipt_p50_s",
        "receipt_p99_s",
        "backlog_flat",
        "max_flat_updates_per_s",
        "intake_vs_limit",
        "aggregator_rss_mb",
        "broker_rss_mb",
        "backlog",
    ):
        assert key in r, key
    assert r["sites"] == 4 and 1500 < r["params"] < 2500 and r["procs"] == 2
    # the run drained: every update a site sealed got a signed receipt, none was refused
    assert r["sealed"] > 0 and r["receipted"] == r["sealed"], (r["sealed"], r["receipted"], r["errors"])
    assert set(r["verdicts"]) <= {"applied", "buffered"} and not r["errors"]
    assert r["verdicts"].get("applied", 0) >= r["sealed"]  # K = 1: each update makes its own version
    assert r["updates_per_s"] > 0 and 0 < r["receipt_p50_s"] <= r["receipt_p99_s"]
    assert r["aggregator_rss_mb"] > 0 and r["broker_rss_mb"] > 0 and r["limit_cpu_ms_per_update"] > 0
    assert next(p["phase"] for p in r["phases"]) == "steady" and r["backlog"][-1][1] == 0
    # each phase's own aggregator peak, none above the run's
    assert all(0 < p["aggregator_rss_mb"] <= r["aggregator_rss_mb"] for p in r["phases"])
    # the CPU budget per update: every component, and a total that is their sum
    budget = r["cpu_ms_per_update"]
    assert budget["sites"] > 0 and budget["aggregator"] > 0 and budget["broker"] >= 0
    assert budget["total"] == pytest.approx(budget["sites"] + budget["broker"] + budget["aggregator"])
    assert 0 < r["machine_cpu_busy"] and set(r["steady_cpu_ms_per_update"]) == set(budget)


@pytest.mark.slow
@pytest.mark.broker
def test_scale_bench_runs_with_two_intake_workers_and_the_same_fields(capsys) -> None:
    """`--workers 2`: a reducer and two `fedline aggregator --worker` processes; the run drains, same JSON."""
    bench = _load()
    args = ["--json", "--sites", "4", "--params", "2000", "--minutes", "0.1", "--rate-per-site", "1"]
    assert bench.main([*args, "--step-s", "2", "--max-steps", "1", "--procs", "2", "--workers", "2"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["workers"] == 2 and r["sealed"] > 0 and r["receipted"] == r["sealed"], (r["sealed"], r["errors"])
    assert set(r["verdicts"]) <= {"applied", "buffered"} and not r["errors"]
    assert r["steady_cpu_ms_per_update"]["reducer"] > 0 and r["steady_cpu_ms_per_update"]["intake_workers"] > 0
    steady = r["phases"][0]["cpu_cores"]
    assert steady["intake_workers"] > 0 and steady["aggregator"] == pytest.approx(
        steady["reducer"] + steady["intake_workers"]
    )
