"""Privacy: a membership-inference attacker who sees a site's delta gains little with DP on.

The measurement is ``bench/privacy_mia.py`` (read its docstring for the attack):
the edge trainer's own round, DP off and DP on (Opacus DP-SGD), on a task made
to be memorised (random labels), seeded so the figures are reproducible.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

#: stated bound on the DP-on advantage: the noise floor of 256 vs 256 records
#: (the untrained model scores ~0.1) plus a margin
DP_ON_MAX_ADVANTAGE = 0.2
#: the DP-off attack must beat the DP-on one by at least this much
MIN_GAP = 0.25


def _bench():
    spec = importlib.util.spec_from_file_location("privacy_mia", ROOT / "bench" / "privacy_mia.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["privacy_mia"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_advantage_is_max_tpr_minus_fpr() -> None:
    mia = _bench()
    assert mia.advantage(np.array([0.1, 0.2]), np.array([0.8, 0.9])) == 1.0
    assert mia.advantage(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0.0
    assert abs(mia.advantage(np.array([0.1, 0.9]), np.array([0.5, 0.95])) - 0.5) < 1e-12
    assert abs(mia.dp_bound(0.0, 0.0)) < 1e-12 and mia.dp_bound(50.0, 1e-5) > 0.999


def test_dp_keeps_membership_advantage_near_zero() -> None:
    mia = _bench()
    s = mia.Setup(seed=0)
    off, on, floor = mia.measure(s)
    print(
        f"\nadvantage DP off {off.advantage:.3f}, DP on {on.advantage:.3f} (epsilon {on.epsilon:.2f}), "
        f"floor {floor.advantage:.3f}"
    )
    assert off.epsilon is None and on.epsilon is not None and 0 < on.epsilon < 8.0
    assert off.member_loss < off.nonmember_loss, "DP off should memorise the members"
    assert on.advantage < off.advantage
    assert off.advantage - on.advantage >= MIN_GAP
    assert on.advantage <= DP_ON_MAX_ADVANTAGE
    assert on.advantage <= on.bound  # the theorem, as a sanity check on the accounting
