"""bench/infer.py runs and reports what it promises (tiny settings; figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_infer_json_smoke() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "infer.py"),
            "--json",
            "--seconds",
            "0.6",
            "--swaps",
            "2",
            "--iterations",
            "50",
            "--rate",
            "500",
            "--no-torch-baseline",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["torch_imported"] is False
    assert r["swap_model_dir_ms"]["count"] == 2
    assert r["service"]["rows"] > 0 and r["service"]["refused"] == {}
    assert 0 < r["model_latency_us"]["row_p50"] <= r["model_latency_us"]["row_p99"]
    assert r["rss"]["peak_kb"] >= r["rss"]["start_kb"] > 0
