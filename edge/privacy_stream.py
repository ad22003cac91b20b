"""A long simulated stream through the per-record ledger: what a site's privacy looks like over months.

Why: the demo runs minutes, a plant runs years. This drives the real
:class:`edge.ledger_privacy.RecordLedger` and the real round plan
(:func:`edge.trainer.plan_round`) over rows arriving at 1 Hz (row ``i`` stored
at ``ts = i`` s, held out by the dataset's own hash of its id), with rounds by
time and a sliding window by age, and reports the per-record guarantee next to
what one accountant over the site's whole history would say, and the round at
which that accountant would have stopped the site for good. No training runs:
privacy accounting does not depend on the data's values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edge.config import PrivacyConfig, TrainingConfig
from edge.ledger_privacy import RecordLedger
from edge.trainer import plan_round


class StreamIndex:
    """Rows at 1 Hz: row ``i`` stored at ``ts = i`` seconds; a share held out by the dataset's hash of the id."""

    def __init__(self, n_max: int, holdout_fraction: float) -> None:
        ids = np.arange(n_max + 1, dtype=np.int64)
        train = ((ids * 2654435761) % 2**32) / 2**32 >= holdout_fraction  # edge.dataset._is_holdout, vectorised
        train[0] = False
        self.training = train
        self._cum = np.concatenate([[0], np.cumsum(train)])
        self.now = 0  # the last row id stored so far

    def last_id(self) -> int:
        return self.now

    def first_id_since(self, ts: float) -> int | None:
        i = max(1, math.ceil(ts))
        return i if i <= self.now else None

    def count_training(self, lo: int, hi: int) -> int:
        hi = min(hi, self.now)
        return 0 if hi < lo else int(self._cum[hi + 1] - self._cum[lo])


@dataclass(frozen=True)
class StreamReport:
    """The outcome of one simulated stream (all figures at the configured δ)."""

    rounds: int
    every_s: float
    window_s: float
    batch_size: int
    epsilon_budget: float
    per_record_epsilon: float  # the guarantee at the end (the max over every row that ever existed)
    per_record_epsilon_at_half: float  # the same half-way: equal when it is flat
    global_epsilon: float  # one accountant over every round
    global_stops_at_round: int | None  # the first round that accountant would have refused (None: never)
    rows_retired: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def simulate_stream(
    privacy: PrivacyConfig,
    batch_size: int = 64,
    rounds: int = 1000,
    every_s: float = 1000.0,
    window_s: float = 50_000.0,
    holdout_fraction: float = 0.1,
) -> StreamReport:
    """Run ``rounds`` time-based rounds over a 1 Hz stream with a ``window_s`` sliding window."""
    index = StreamIndex(int(rounds * every_s) + 10, holdout_fraction)
    ledger = RecordLedger(privacy)
    training = TrainingConfig(batch_size=batch_size)

    def plan(n: int) -> tuple[float, int]:
        p = plan_round(n, training)
        return p.sample_rate, p.steps

    stops: int | None = None
    half = 0.0
    for r in range(1, rounds + 1):
        index.now = int(r * every_s)
        sel = ledger.select(index, r * every_s, plan, max_age_s=window_s)
        if sel is not None:
            ledger.commit(ledger.state_after(sel))
        if stops is None and ledger.global_epsilon > privacy.epsilon:
            stops = r
        if r == rounds // 2:
            half = ledger.epsilon
    return StreamReport(
        rounds=rounds,
        every_s=every_s,
        window_s=window_s,
        batch_size=batch_size,
        epsilon_budget=privacy.epsilon,
        per_record_epsilon=ledger.epsilon,
        per_record_epsilon_at_half=half,
        global_epsilon=ledger.global_epsilon,
        global_stops_at_round=stops,
        rows_retired=ledger.retired,
    )


def demo_stream(
    epsilon: float, delta: float, noise_multiplier: float, rounds: int = 1200, simulated: int = 150
) -> dict[str, Any]:
    """The demo report's long stream at the example site settings (batch 64, a 50,000 s window at 1 Hz, no
    hold-out, a round every 1,000 s) and the demo's budget, δ and σ, cheaply.

    ``simulated`` rounds run through the ledger (the window is full after 50); from then on every round
    trains the same 50,001 rows at the same q and steps, so each row's ε stays where it is and the
    global-history accountant grows by that round's RDP curve per round: it is extended to ``rounds``
    by adding that curve (no approximation: the same sum the simulation would make).
    """
    cfg = PrivacyConfig(epsilon=epsilon, delta=delta, noise_multiplier=noise_multiplier)
    index = StreamIndex(int(simulated * 1000.0) + 10, 0.0)
    ledger = RecordLedger(cfg)
    training = TrainingConfig(batch_size=64)

    def plan(n: int) -> tuple[float, int]:
        p = plan_round(n, training)
        return p.sample_rate, p.steps

    stops: int | None = None
    for r in range(1, simulated + 1):
        index.now = r * 1000
        sel = ledger.select(index, r * 1000.0, plan, max_age_s=50_000.0)
        if sel is not None:
            ledger.commit(ledger.state_after(sel))
        if stops is None and ledger.global_epsilon > epsilon:
            stops = r
    steady = ledger._round_rdp(ledger.rounds[-1])
    total = ledger.total_rdp.copy()
    for r in range(simulated + 1, rounds + 1):
        total = total + steady
        if stops is None and ledger._eps(total) > epsilon:
            stops = r
    return StreamReport(
        rounds=rounds,
        every_s=1000.0,
        window_s=50_000.0,
        batch_size=64,
        epsilon_budget=epsilon,
        per_record_epsilon=ledger.epsilon,
        per_record_epsilon_at_half=ledger.epsilon,
        global_epsilon=ledger._eps(total),
        global_stops_at_round=stops,
        rows_retired=ledger.retired,
    ).to_dict()
