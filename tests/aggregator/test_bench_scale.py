"""bench/scale.py stays runnable: a few real sites, a real Mosquitto and `fedline aggregator`, a few seconds."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
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
    # the aggregator's threads by the names fedline gives them at the OS level (fedline.threadname)
    # (a pool starts its threads as work comes: a small run may never need the second opening thread)
    names = set(r["aggregator_thread_names"])
    assert {"fedline-agg", "agg-open_0", "agg-decide_0", "agg-export_0"} <= names
    assert {n for n in names if n.startswith("agg-open")} <= {"agg-open_0", "agg-open_1"}  # [aggregator] workers = 2
    for s in r["phases"]:  # its CPU by thread role: the roles sum to the process's CPU per update
        by_thread = s["aggregator_cpu_ms_per_update_by_thread"]
        assert {"MainThread", "agg-open", "agg-decide", "other"} <= set(by_thread)
        # psutil's total and the threads' snapshots are read a moment apart: a few clock ticks' difference
        tick_ms = 1e3 / bench.CLK_TCK / max(round(s["updates_per_s"] * s["seconds"]), 1)
        assert sum(by_thread.values()) == pytest.approx(s["aggregator_cpu_ms_per_update"], abs=4 * tick_ms)
    assert r["aggregator_cpu_ms_per_update_by_thread"]["MainThread"] > 0


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
    # the workers' threads by their OS names, summed over the workers beside the reducer's own
    assert {"fedline-agg", "fedline-intake", "intake-open_0", "agg-decide_0"} <= set(r["aggregator_thread_names"])
    by_thread = r["phases"][0]["aggregator_cpu_ms_per_update_by_thread"]
    assert {"MainThread", "agg-decide", "workers/MainThread", "workers/intake-open", "workers/other"} <= set(by_thread)
    assert by_thread["workers/MainThread"] > 0


def test_scale_bench_splits_the_aggregators_cpu_by_thread_as_worked_by_hand() -> None:
    """Two /proc snapshots of one process (pid 100, 100 clock ticks a second) and the split worked by hand."""
    bench = _load()
    snap = bench.ThreadSnapshot
    before = snap(
        100,
        1000,
        {
            100: ("fedline-agg", 600),  # the main thread: its role whatever its name
            101: ("agg-open_0", 150),
            102: ("agg-open_1", 140),
            103: ("agg-decide_0", 80),
            104: ("python", 20),  # a thread fedline did not name (OpenBLAS's)
            105: ("agg-export_0", 5),
            106: ("python", 5),  # ends before the second snapshot
        },
    )
    after = snap(
        100,
        1500,
        {
            100: ("fedline-agg", 800),  # +200
            101: ("agg-open_0", 210),  # +60
            102: ("agg-open_1", 195),  # +55
            103: ("agg-decide_0", 150),  # +70
            104: ("python", 21),  # +1
            105: ("agg-export_0", 9),  # +4
            107: ("agg-export_0", 3),  # new since: all 3 of its ticks, with the thread that started it
        },
    )
    # named: 200 + 115 + 70 + 7 = 392 ticks, unnamed and alive 1; the process used 500: the 107 ticks no
    # live thread accounts for (106's last ones) are other's too: 1 + 107 = 108
    got = bench.cpu_by_thread(before, after, clk_tck=100)
    want = {"MainThread": 2.00, "agg-decide": 0.70, "agg-export": 0.07, "agg-open": 1.15, "other": 1.08}
    assert got == pytest.approx(want) and list(got) == list(want)  # the main thread first, other last
    assert sum(got.values()) == pytest.approx(5.00)
    # per update in a phase of 250 receipts: ms = seconds * 1000 / 250
    phase = bench.Phase("steady", 1 / 60, started=0.0, ended=60.0, receipts=250, threads=got)
    per_update = phase.summary(1000)["aggregator_cpu_ms_per_update_by_thread"]
    assert per_update == pytest.approx(
        {"MainThread": 8.0, "agg-decide": 2.8, "agg-export": 0.28, "agg-open": 4.6, "other": 4.32}
    )
    # the bare limit at 1.38 ms per update over the opening threads' 4.6 ms
    assert bench.open_vs_limit(1.38, per_update) == pytest.approx(0.3)
    assert bench.open_vs_limit(
        1.38, {"MainThread": 1.0, "workers/intake-open": 2.76, "agg-open": 9.0}
    ) == pytest.approx(0.5)
    assert bench.open_vs_limit(1.38, {"MainThread": 1.0}) is None


def test_scale_bench_reads_thread_cpu_from_proc() -> None:
    """utime + stime of a stat line whose name holds ") ", and a real snapshot of this process."""
    bench = _load()
    line = "1234 (we) ird) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 37 0 0 20 0 3 0 5 0 0\n"
    assert bench.stat_ticks(line) == 250 + 37
    me = bench.read_threads(os.getpid())
    assert me.pid == os.getpid() and os.getpid() in me.threads and threading.get_native_id() in me.threads
    assert 0 <= me.threads[os.getpid()][1] <= me.total
    # two pool threads named by fedline.threadname count as one role, this (main) thread as MainThread
    assert bench.thread_role(os.getpid(), os.getpid(), me.threads[os.getpid()][0]) == "MainThread"
    assert bench.thread_role(1, 2, "intake-open_12") == "intake-open" and bench.thread_role(1, 2, "python3") == "other"
    assert bench.thread_role(1, 2, "asyncio_0") == "asyncio"
