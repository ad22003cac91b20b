"""bench/ingest.py keeps working: a small run prints one JSON object with every pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ingest_benchmark_smoke() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "ingest.py"),
            "--json",
            "--modbus-samples",
            "50",
            "--sparkplug-samples",
            "500",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    doc = json.loads(out)
    by_name = {r["pipeline"]: r for r in doc["results"]}
    assert set(by_name) == {"csv", "modbus_tcp", "sparkplug_decode"}
    assert by_name["csv"]["samples"] == by_name["csv"]["rows"] == 10000
    assert by_name["modbus_tcp"]["samples"] == by_name["modbus_tcp"]["rows"] == 50
    assert by_name["sparkplug_decode"]["samples"] == by_name["sparkplug_decode"]["rows"] == 500
    assert all(r["samples_per_s"] > 0 and r["cpu_ms_per_1000"] > 0 for r in doc["results"])
