"""The paired tests the served-model pick switches by (edge/paired_evidence.py), on numbers worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge.paired_evidence import auc_evidence, mse_evidence


def test_delong_on_five_rows_worked_by_hand():
    """Two failures, three normal rows. Placements (DeLong 1988): a positive's share of negatives below it,
    a negative's share of positives above it (ties count half).

    challenger a: positives 0.9, 0.6; negatives 0.7, 0.2, 0.1
      V10 = [3/3, 2/3], V01 = [1/2, 2/2, 2/2], AUC = 5/6
    baseline b: positives 0.8, 0.4; negatives 0.5, 0.4 (tied with a positive), 0.2
      V10 = [3/3, (1 + 1/2)/3 = 1/2], V01 = [1/2, (1 + 1/2)/2 = 3/4, 2/2], AUC = 3/4
    differences: V10 [0, 1/6] (sample variance 1/72), V01 [0, 1/4, 0] (sample variance 1/48)
    var = (1/72) / 2 + (1/48) / 3 = 1/144 + 1/144 = 1/72; gain 1/12; z = (1/12) * sqrt(72) = 1/sqrt(2)
    p = 1 - Phi(0.7071) = 0.23975
    """
    y = np.array([1, 1, 0, 0, 0], dtype=float)
    a = np.array([0.9, 0.6, 0.7, 0.2, 0.1])
    b = np.array([0.8, 0.4, 0.5, 0.4, 0.2])
    ev = auc_evidence(y, a, b)
    assert ev.gain == pytest.approx(1 / 12)
    assert ev.se == pytest.approx(1 / math.sqrt(72))
    assert ev.z == pytest.approx(1 / math.sqrt(2))
    assert ev.p == pytest.approx(0.23975, abs=1e-5)
    assert (ev.units, ev.test) == (2, "delong")  # two failures: the rarer class
    flipped = auc_evidence(y, b, a)  # the same test from the other side
    assert flipped.gain == pytest.approx(-1 / 12) and flipped.p == pytest.approx(1 - 0.23975, abs=1e-5)


def test_delong_needs_two_of_each_class():
    ev = auc_evidence(np.array([1, 0, 0, 0.0]), np.array([0.9, 0.1, 0.2, 0.3]), np.array([0.5, 0.1, 0.2, 0.3]))
    assert math.isnan(ev.p) and ev.units == 1


def test_paired_mse_over_units_worked_by_hand():
    """Three engines of two rows each (label 0). Squared errors, baseline minus challenger, per row:
    A: 4-1, 4-1 = 3, 3; B: 1-1 = 0, 0; C: 1-0 = 1, 1.
    D = 8/6 = 4/3; unit sums S = 6, 0, 2; S_g - n_g D = 10/3, -8/3, -2/3, squares sum 168/9 = 56/3;
    var = G/(G-1) * (56/3) / N^2 = (3/2)(56/3)/36 = 7/9; se = sqrt(7)/3; t = 4/sqrt(7) on 2 degrees of freedom.
    Student's t with 2 df: P(T > t) = 1/2 - t / (2 sqrt(t^2 + 2)) = 1/2 - 2/sqrt(30) = 0.134852.
    Read as six independent rows instead: s^2 = (28/3)/5, se^2 = 28/90, z = 2.390, p = 0.0084: the
    rows of one engine counted as independent evidence overstate it sixteen-fold.
    """
    y = np.zeros(6)
    challenger = np.array([1, 1, 1, 1, 0, 0], dtype=float)
    baseline = np.array([2, 2, 1, 1, 1, 1], dtype=float)
    ev = mse_evidence(y, challenger, baseline, ["A", "A", "B", "B", "C", "C"])
    assert ev.gain == pytest.approx(4 / 3)
    assert ev.se == pytest.approx(math.sqrt(7) / 3)
    assert ev.p == pytest.approx(0.5 - 2 / math.sqrt(30))
    assert (ev.units, ev.test) == (3, "paired-mse")
    rows = mse_evidence(y, challenger, baseline)
    assert rows.se == pytest.approx(math.sqrt(28 / 90))
    assert rows.p == pytest.approx(0.5 * math.erfc((4 / 3) / math.sqrt(28 / 90) / math.sqrt(2)))
    assert rows.p < 0.01 < 0.13 < ev.p


def test_one_engine_alone_does_not_make_a_better_model():
    """Five engines of two rows; the challenger is exact on engine A and as wrong as the baseline elsewhere:
    its RMSE is 10.6 % lower (sqrt(0.8) against 1), all of it on one engine. D = 0.2, unit sums 2, 0, 0, 0, 0,
    residuals 1.6, -0.4 (x4), var = (5/4)(2.56 + 0.64)/100 = 0.04, se = 0.2, t = 1 on 4 df:
    P(T4 > 1) = 1/2 - (3/8)(1/sqrt(1.25))(1 - 0.8/12) = 0.186950."""
    y = np.zeros(10)
    challenger = np.array([0, 0] + [1] * 8, dtype=float)
    ev = mse_evidence(y, challenger, np.ones(10), list("AABBCCDDEE"))
    assert (ev.gain, ev.se) == (pytest.approx(0.2), pytest.approx(0.2))
    assert ev.p == pytest.approx(0.5 - 3 / 8 / math.sqrt(1.25) * (1 - 0.8 / 12))


def test_unit_labels_must_match_the_rows():
    with pytest.raises(ValueError, match="3 unit labels for 2 validation rows"):
        mse_evidence(np.zeros(2), np.zeros(2), np.ones(2), ["A", "B", "C"])
