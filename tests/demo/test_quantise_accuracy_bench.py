"""bench/quantise_accuracy.py pairs the two split studies by split, site and model."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "quantise_accuracy.py"


def _study(values: list[tuple[float, float]]) -> dict:
    return {"per_split": [{"sites": {"H": {"federated": f, "served": s}}} for f, s in values]}


def test_differences_are_paired_by_split() -> None:
    f32 = _study([(0.80, 0.90), (0.70, 0.85), (0.90, math.nan)])
    i8 = _study([(0.78, 0.91), (0.71, 0.83), (0.86, 0.95)])
    out = runpy.run_path(str(BENCH))["compare"](f32, i8)["H"]
    fed = out["federated"]
    assert fed["per_split_diff"] == pytest.approx([-0.02, 0.01, -0.04])
    assert fed["mean_diff"] == pytest.approx(-0.05 / 3)
    mean = -0.05 / 3
    sd = math.sqrt(((-0.02 - mean) ** 2 + (0.01 - mean) ** 2 + (-0.04 - mean) ** 2) / 2)
    assert fed["sd_diff"] == pytest.approx(sd) and fed["se_diff"] == pytest.approx(sd / math.sqrt(3))
    assert fed["float32_mean"] == pytest.approx(0.8) and fed["int8_mean"] == pytest.approx(2.35 / 3)
    # a split where one run has no score is left out of the pairs
    assert out["served"]["per_split_diff"] == pytest.approx([0.01, -0.02])
