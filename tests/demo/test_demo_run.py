"""``fedline demo`` end to end, shortened: real Mosquitto, real processes, a report.

Two runs: the bundled AI4I file (four sites, one cut off for a while) with fewer rows and
versions, and the bring-your-own-data path on a regression CSV made here from a formula plus
noise. Each asserts what the report must show, and runs a 2-split study; the full-size
claims (federated beats local-only on the smallest site, over 10 splits) are for the
default run (`make demo`), whose figures are in the report it writes.
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from broker_bridge.mosquitto import mosquitto_binary

ROOT = Path(__file__).resolve().parents[2]


def run_demo(tmp_path: Path, *args: str, timeout: float = 170) -> tuple[dict, str]:
    if mosquitto_binary() is None:
        pytest.fail("this test needs the mosquitto broker: apt-get install mosquitto")
    report = tmp_path / "report"
    cmd = [sys.executable, "-m", "fedline.cli", "demo", "--no-progress", "--run-dir", str(tmp_path / "run"),
           "--report", str(report), *args]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert (report / "report.json").exists(), out[-3000:]
    return json.loads((report / "report.json").read_text()), out


@pytest.mark.broker
def test_shortened_ai4i_demo(tmp_path):
    rep, out = run_demo(tmp_path, "--max-rows-per-site", "400", "--versions", "3", "--cut-after-version", "1",
                        "--cut-seconds", "3", "--round-seconds", "1.5", "--timeout", "100", "--splits", "2")
    assert "private Mosquitto" in out
    assert rep["task"] == "classification" and rep["metric"] == "roc_auc"
    assert [s["site"] for s in rep["sites"]] == ["L1", "L2", "M", "H"]  # L's rows run as two plants
    assert rep["model_versions"] >= 3
    assert rep["raw_records_on_wire"] == 0 and rep["audit"]["messages"] > 20
    checks = rep["checks"]
    assert checks["no_raw_records_on_wire"] and checks["epsilon_within_budget"]
    assert checks["intermittent_site_accounted"], json.dumps(rep["sites"], indent=1)
    m = next(s for s in rep["sites"] if s["intermittent"])
    assert m["site"] == "L2" and rep["intermittent"]["cut_at"] is not None and rep["intermittent"]["restored_at"]
    for s in rep["sites"]:
        assert s["updates_sent"] >= 1 and s["bytes_sent"] > 0 and 0 < s["epsilon"] <= s["epsilon_budget"]
        assert 0.0 <= s["metric_federated"] <= 1.0 and 0.0 <= s["metric_local"] <= 1.0
        assert s["predictions"] > 0  # the line inference scored the PLC's rows
    assert rep["bytes_on_wire"] > sum(s["bytes_sent"] for s in rep["sites"])
    assert rep["updates"]["applied"] + rep["updates"]["stale_dropped"] >= 6
    assert [h["version"] for h in rep["history"]] == sorted({h["version"] for h in rep["history"]})
    assert (tmp_path / "report" / "metric_per_version.png").stat().st_size > 1000
    assert "Must be shown" in (tmp_path / "report" / "report.md").read_text()
    study = rep["split_study"]  # the comparison repeated in-process on 2 splits, M missing its cut-off rounds
    assert study["splits"] == 2 and [r["split_seed"] for r in study["per_split"]] == [0, 1]
    first, end = study["absent_rounds"]["L2"]
    assert (first, end) == (rep["intermittent"]["version_at_cut"], rep["intermittent"]["version_at_restore"])
    for r in study["per_split"]:
        assert set(r["sites"]) == {"L1", "L2", "M", "H"}
        for v in r["sites"].values():
            assert 0.0 <= v["local"] <= 1.0 and 0.0 <= v["federated"] <= 1.0 and 0 < v["epsilon"] <= 8.0
    assert 0 <= study["sites"]["H"]["federated_wins"] <= 2
    assert checks["federated_beats_local_on_smallest_site_across_splits"] in (True, False)
    assert "split study" in out


@pytest.mark.broker
def test_bring_your_own_regression_csv_reports_rmse(tmp_path):
    rng = np.random.default_rng(7)
    path = tmp_path / "line-speed.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["plant", "feed", "temp", "load", "energy"])
        for i in range(900):
            plant = ["north", "south"][i % 2] if i < 700 else "south"
            feed, temp, load = rng.uniform(0, 10), rng.uniform(20, 80), rng.uniform(0, 1)
            energy = 3.0 * feed + 0.5 * temp + 20.0 * load * load + rng.normal(0, 1.0)
            w.writerow([plant, f"{feed:.3f}", f"{temp:.2f}", f"{load:.4f}", f"{energy:.3f}"])
    rep, _out = run_demo(tmp_path, "--csv", str(path), "--site-column", "plant", "--label", "energy",
                        "--features", "feed,temp,load", "--task", "regression", "--versions", "3",
                        "--cut-after-version", "1", "--cut-seconds", "3", "--round-seconds", "1.5", "--timeout", "100",
                        "--splits", "2")
    assert rep["task"] == "regression" and rep["metric"] == "rmse"
    assert {s["site"]: s["rows"] for s in rep["sites"]} == {"south": 550, "north": 350}
    y = np.array([float(r["energy"]) for r in csv.DictReader(path.open())])
    for s in rep["sites"]:
        for key in ("metric_local", "metric_federated", "metric_central"):
            assert s[key] is not None and math.isfinite(s[key]) and s[key] > 0, (key, s)
        assert s["metric_central"] < y.std()  # the central reference learns the formula
    assert rep["raw_records_on_wire"] == 0
    assert rep["checks"]["intermittent_site_accounted"]
    assert "RMSE (lower is better)" in (tmp_path / "report" / "report.md").read_text()
    for r in rep["split_study"]["per_split"]:  # RMSE in the label's unit, for both models
        for v in r["sites"].values():  # local-only learns the formula (as in the run); 3 versions are few
            assert 0 < v["local"] < y.std() and 0 < v["federated"] and math.isfinite(v["federated"])
