"""`fedline infer --config line.toml` end to end in a fresh process: real CSV source (the AI4I data),
real row mapping, real onnxruntime, JSON-lines output, and no torch in the process."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.inference.model_dir import publish_model
from tests.inference.onnx_models import linear_onnx, linear_score

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "ai4i2020.csv"
FEATURES = [
    ("Air temperature [K]", 295.0, 305.0),
    ("Process temperature [K]", 305.0, 315.0),
    ("Rotational speed [rpm]", 1100.0, 2900.0),
    ("Torque [Nm]", 0.0, 80.0),
    ("Tool wear [min]", 0.0, 260.0),
]
W = np.array([0.5, -0.5, -2.0, 3.0, 2.0])
B = -2.5


def write_config(tmp_path: Path, n_rows: int) -> Path:
    head = DATA.read_text().splitlines()[: n_rows + 1]
    (tmp_path / "line.csv").write_text("\n".join(head) + "\n")
    feats = ", ".join(f'{{ tag = "{t}", range = [{lo}, {hi}] }}' for t, lo, hi in FEATURES)
    cfg = tmp_path / "line.toml"
    cfg.write_text(f"""
[line]
site = "site-a"
federation = "test"
model_source = "model_dir"
model_dir = "models"
state_dir = "state"

[[sources]]
kind = "csv"
path = "line.csv"

[rows]
features = [{feats}]
label = "Machine failure"

[output]
file = "out/predictions.jsonl"
threshold = 0.5
""")
    return cfg


def line_inputs(tmp_path: Path) -> tuple[list[dict[str, str]], np.ndarray]:
    """line.csv's rows, and their features scaled by the engineering ranges (before the line's clamp)."""
    with (tmp_path / "line.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    lo = np.array([f[1] for f in FEATURES])
    hi = np.array([f[2] for f in FEATURES])
    return rows, (np.array([[float(r[t]) for t, _, _ in FEATURES] for r in rows]) - lo) / (hi - lo)


def run_infer(cfg: Path) -> subprocess.CompletedProcess[str]:
    """``fedline infer --config cfg`` in a fresh process, from the config's folder; it must exit 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "fedline.cli", "infer", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cfg.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_cli_scores_a_csv_replay_without_importing_torch(tmp_path: Path) -> None:
    n = 2000
    cfg = write_config(tmp_path, n)
    publish_model(tmp_path / "models", linear_onnx(W, B), 7)
    code = (
        "import json, sys\nfrom fedline.cli import main\n"
        f"rc = main(['infer', '--config', {str(cfg)!r}])\n"
        "comm = open('/proc/self/comm').read().strip()\n"
        "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 'comm': comm}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "torch": False, "comm": "fedline-line"}  # named at the OS level (top -H, ps)
    assert "model.swapped" in proc.stderr and "infer.stopped" in proc.stderr

    preds = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [p["seq"] for p in preds] == list(range(n))
    rows, x = line_inputs(tmp_path)
    want = linear_score(W, B, np.clip(x, 0, 1))
    got = np.array([p["score"] for p in preds])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert {p["version"] for p in preds} == {7}
    assert [p["alarm"] for p in preds] == [bool(s >= 0.5) for s in got]
    assert 0 < sum(p["alarm"] for p in preds) < n  # the threshold is exercised both ways
    assert [p["label"] for p in preds] == [float(r["Machine failure"]) for r in rows]


@pytest.mark.parametrize(
    "old, new, message",
    [
        ('kind = "csv"', 'kind = "csv"\nrate = 3', "line.toml: sources[0].rate: unknown key"),
        (
            "threshold = 0.5",
            "threshold = 0.5\nfile_keep = 0",
            "line.toml: output: need file_max_mb >= 0 and file_keep >= 1",
        ),
    ],
)
def test_cli_reports_a_bad_config_by_file_and_key(tmp_path: Path, old: str, new: str, message: str) -> None:
    cfg = write_config(tmp_path, 10)
    cfg.write_text(cfg.read_text().replace(old, new))
    proc = subprocess.run(
        [sys.executable, "-m", "fedline.cli", "infer", "--config", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 78  # EX_CONFIG
    assert message in proc.stderr


def test_predictions_file_rotates_and_keeps_the_newest(tmp_path: Path) -> None:
    """A line never stops, a line PC's disk is small: past file_max_mb the file rotates between batches,
    file_keep old files are kept (the oldest dropped), and no record is split or lost among those kept."""
    n = 2000
    cfg = write_config(tmp_path, n)
    cfg.write_text(cfg.read_text().replace("threshold = 0.5", "threshold = 0.5\nfile_max_mb = 0.03\nfile_keep = 3"))
    publish_model(tmp_path / "models", linear_onnx(W, B), 7)
    proc = run_infer(cfg)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "predictions.jsonl",
        "predictions.jsonl.1",
        "predictions.jsonl.2",
        "predictions.jsonl.3",
    ]
    assert "output.rotated" in proc.stderr
    seqs = []
    for name in ["predictions.jsonl.3", "predictions.jsonl.2", "predictions.jsonl.1", "predictions.jsonl"]:
        text = (out / name).read_text()
        assert text.endswith("\n")
        if name != "predictions.jsonl":
            assert len(text.encode()) >= 0.03 * 2**20  # rotated only once past the limit
        seqs += [json.loads(line)["seq"] for line in text.splitlines()]
    assert seqs[-1] == n - 1 and seqs == list(range(seqs[0], n))  # contiguous: nothing split or lost in between
    assert seqs[0] > 0  # the oldest file was dropped


def test_a_reading_outside_its_engineering_range_is_clamped_and_flagged(tmp_path: Path) -> None:
    """The attack suite's backdoor trigger as a PLC would report it: air temperature 6 σ high (312 K, outside
    its range [295, 305] K). The line's RowBuilder clamps it to the range (the model sees 305 K, the value
    it would see for a reading of 305 K exactly), counts it and warns once (issue 14)."""
    cfg = write_config(tmp_path, 20)
    lines = (tmp_path / "line.csv").read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("Air temperature [K]")
    for i, hot in ((4, "312.0"), (5, "305.0")):  # a row out of range, and the same kind of row at the range's top
        cells = lines[i].split(",")
        cells[col] = hot
        lines[i] = ",".join(cells)
    (tmp_path / "line.csv").write_text("\n".join(lines) + "\n")
    publish_model(tmp_path / "models", linear_onnx(W, B), 7)
    proc = run_infer(cfg)
    preds = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    _, x = line_inputs(tmp_path)
    clamped = np.clip(x, 0, 1)
    assert x[3, 0] == pytest.approx(1.7) and clamped[3, 0] == 1.0  # 312 K -> 305 K
    np.testing.assert_allclose([p["score"] for p in preds], linear_score(W, B, clamped), atol=1e-5)
    assert proc.stderr.count("rows.out_of_range") == 1  # warned once
    stopped = [line for line in proc.stderr.splitlines() if "infer.stopped" in line]
    assert len(stopped) == 1 and stopped[0].endswith(" out_of_range=1"), stopped
