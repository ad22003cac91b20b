"""bench/secagg.py stays runnable, and on tiny cohorts its secure sum matches the plain one."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "secagg.py"


def test_secagg_bench_runs_quick_and_reports_the_required_keys(capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_secagg", BENCH)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    assert mod.main(["--json", "--quick"]) == 0
    doc = json.loads(capsys.readouterr().out)
    for key in (
        "site_extra_ms_5x2k",
        "unmask_s_8x2k_drop0",
        "unmask_s_8x2k_drop20",
        "bytes_ratio_5x2k",
        "max_abs_error_vs_plain",
    ):
        assert doc[key] is not None, key
    assert [(r["sites"], r["dropped"]) for r in doc["rows"]] == [(5, 0), (5, 1), (8, 0), (8, 2)]
    assert 0 < doc["max_error_over_bound"] < 1.0  # within the stated quantisation bound, and not exact
    assert all(r["secure_bytes"] > r["plain_bytes"] for r in doc["rows"])
    assert doc["prg_mb_per_s"] > 0 and doc["libsodium_mb_per_s"] > 0


@pytest.mark.broker
def test_secagg_bench_wire_part_publishes_every_cohort_message_both_ways(capsys) -> None:
    """--wire starts its own Mosquitto; every message of each cohort must reach a subscriber in both modes (the
    bench raises otherwise). Its times are the bench's to report, not asserted here."""
    spec = importlib.util.spec_from_file_location("bench_secagg_wire", BENCH)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    assert mod.main(["--json", "--quick", "--wire"]) == 0
    doc = json.loads(capsys.readouterr().out)
    # 5 and 8 sites: announcement, n buffered receipts, survivors, n requests, n applied receipts, 2 clears,
    # and 2 replies from each member
    assert [(w["sites"], w["messages"]) for w in doc["wire"]] == [(5, 4 + 3 * 5 + 2 * 5), (8, 4 + 3 * 8 + 2 * 8)]
    for w in doc["wire"]:
        for mode in ("awaited", "window"):
            assert set(w[mode]) == {
                "aggregator_held_ms",
                "aggregator_all_acked_ms",
                "member_held_ms_per_reply",
                "member_all_acked_ms",
            }
