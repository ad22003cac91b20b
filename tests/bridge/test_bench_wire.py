"""bench/wire.py stays runnable: its measurement agrees with itself on a tiny update."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "wire.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_wire", BENCH)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def test_wire_bench_measures_a_small_update(capsys) -> None:
    bench = _load()
    row = bench.measure(10_000, budget_s=0.01)
    assert row["raw_bytes"] == 40_000
    assert row["raw_bytes"] < row["sealed_bytes"] < row["raw_bytes"] + 1024  # framing + 48-byte box overhead
    assert 1.0 < row["wire_per_raw_byte"] < row["mqtt_wire_per_raw_byte"] < 1.05
    assert row["seal_sign_MBps"] > 0 and row["secretbox_encrypt_MBps"] > 0
    assert 0.25 < row["int8_wire_vs_float32"] < 0.3  # one byte per parameter, a step per 1,024, framing
    bench.SIZES = (1000,)
    assert bench.main(["--json", "--budget", "0.01"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["benchmark"] == "wire" and [r["params"] for r in doc["results"]] == [1000]
