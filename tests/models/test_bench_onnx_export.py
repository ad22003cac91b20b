"""bench/onnx_export.py runs and reports what it promises (one kind, one repeat; figures are not asserted,
except that both exporters' graphs agree with torch, which is what makes their times comparable)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fedline.testing.patience import bound

REPO = Path(__file__).resolve().parents[2]


def test_bench_onnx_export_json_smoke() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "onnx_export.py"), "--json", "--repeats", "1", "--kinds", "mlp"],
        capture_output=True,
        text=True,
        timeout=bound(120),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["dynamo_available"] is True  # onnxscript comes with the dev extra
    mlp = doc["kinds"]["mlp"]
    assert mlp["torchscript_cpu_s"] > 0 and mlp["dynamo_cpu_s"] > 0
    assert mlp["torchscript_max_diff"] < 1e-5 and mlp["dynamo_max_diff"] < 1e-5
    bad = subprocess.run(
        [sys.executable, str(REPO / "bench" / "onnx_export.py"), "--kinds", "lstm"],
        capture_output=True,
        text=True,
        timeout=bound(60),
    )
    assert bad.returncode == 2 and "unknown lstm" in bad.stderr
