"""``fedline demo --study-only``: the split study alone, in-process, as the full demo runs it after its federation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedline.demo.report import study_claims
from fedline.testing.patience import bound


@pytest.mark.slow
def test_study_only_runs_the_split_study_and_judges_its_claims(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "fedline.cli", "demo", "--study-only", "--max-rows-per-site", "300"]
    cmd += ["--versions", "2", "--splits", "2", "--cut-after-version", "1", "--report", str(tmp_path / "r")]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=bound(300))
    doc = json.loads((tmp_path / "r" / "split-study.json").read_text())
    study = doc["split_study"]
    assert doc["metric"] == "roc_auc" and doc["smallest_site"] == "L1"  # 300 rows each: the first, as the report
    assert study["splits"] == 2 and study["absent_rounds"] == {"L2": [1, 3]}  # the two versions after the cut
    assert set(study["sites"]) == {"L1", "L2", "M", "H"}
    for s in study["per_split"]:
        assert all(v["served_kind"] in ("local", "global", "fine_tuned", "blend") for v in s["sites"].values())
    assert doc["checks"] == study_claims("roc_auc", study["sites"], "L1")
    # two splits cannot show a gain at p < 0.05 (a sign or signed-rank test of 2 says at best 1/4): exit 1
    assert doc["checks"]["smallest_site_served_gains"] is False and r.returncode == 1, r.stdout[-2000:]
    assert "split study only: 2 splits of ai4i2020.csv" in r.stdout
