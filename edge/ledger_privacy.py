"""Per-record (individual) privacy accounting: each row's ε covers only the rounds it was in.

Why: a site's data is a stream. A row that has left the training window is
never trained on again, so what matters for that row is the composition over
the rounds *it* took part in, not over every round the site ever ran
(Feldman & Zrnic 2021, "Individual Privacy Accounting via a Rényi Filter").
One accountant over the site's whole history spends a budget of 8 in about
1,100 rounds at the example settings and then stops the site for good; with
per-record accounting the site publishes for its whole life and every row's
ε stays within the budget.

How, cheaply: rows are identified by their dataset id, which only grows. A
round trains on every non-retired training row with id in ``[lo, hi]``, and
both bounds only grow (rows leave by their own age or history, never because
another row arrived), so the rounds a row took part in are a contiguous run
of rounds, and rows between two consecutive round bounds share one history.
The ledger keeps, per live round, ``(q, σ, steps, lo, hi)``; a row's RDP is
the sum of those rounds' RDP curves (Opacus's ``compute_rdp``, cached per
``(q, σ)``), and its ε is Opacus's ``get_privacy_spent`` over it. Older rows
took part in a superset of a newer row's rounds, so the oldest live row holds
the largest ε; the reported guarantee is the running maximum of that over
every round, i.e. over every row that ever existed.

Before a round, the rows for which one more round (at the round's planned
``q``, ``steps``) would take ε past the budget, or past
``max_rounds_per_row`` rounds, retire: the lower bound moves past them, for
good. Rounds are released only with the ledger state that accounts them (the
state is written in the outbox's transaction, like the global accountant was).

The privacy unit: one stored example. With overlapping windows (``window > 1``
and ``stride < window``) one raw sample sits in ``k = ceil(window / stride)``
examples; ``privacy.window_accounting = "group"`` then accounts every round at
``q' = 1 - (1 - q)^k`` and ``σ' = σ / k`` (sensitivity k·C): the RDP of that
subsampled Gaussian bounds the raw sample's, by the joint convexity of the
Rényi moment over which of its k examples were drawn. ``"disjoint"`` refuses
overlapping windows instead. Either way the ε reported is per raw sample.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edge.config import PrivacyConfig
from fedline.opacus_parts import opacus_module

STATE_VERSION = 1
# the Rényi orders of Opacus's RDP accountant (``RDPAccountant.DEFAULT_ALPHAS``, Opacus 1.6.0), written out: importing
# that class imports every Opacus optimizer and with them torch.distributed.tensor and SymPy (``edge.dpsgd``), which
# an edge's start no longer loads; tests/edge/test_dpsgd.py checks these are Opacus's
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


class RowIndex(Protocol):
    """What the ledger needs to know about the stored rows (``edge.dataset.Dataset`` implements it)."""

    def last_id(self) -> int:
        """The largest row id stored so far (0 when empty)."""

    def first_id_since(self, ts: float) -> int | None:
        """The smallest id of a row stored at or after ``ts`` (None when none)."""

    def count_training(self, lo: int, hi: int) -> int:
        """Training (not held-out) rows with ``lo <= id <= hi``."""


@dataclass(frozen=True)
class LedgerRound:
    """One released round: its accounted parameters (per privacy unit) and the id range it trained on."""

    index: int
    q: float
    sigma: float
    steps: int
    lo: int
    hi: int


@dataclass(frozen=True)
class Selection:
    """The rows one round will train on, and what that round costs each of them."""

    lo: int
    hi: int
    rows: int  # training rows in [lo, hi]
    retiring: int  # rows that retire now (budget or participation cap), before this round
    sample_rate: float  # as trained (per example)
    steps: int
    epsilon_after: float  # the per-record guarantee once this round is released


def group_cost(q: float, sigma: float, group: int) -> tuple[float, float]:
    """``(q', σ')`` that bound one raw sample present in ``group`` examples of a round sampled at ``q``."""
    if group <= 1:
        return q, sigma
    return 1.0 - (1.0 - q) ** group, sigma / group


class RecordLedger:
    """The per-record privacy ledger of one site (state persisted as JSON in the outbox's meta table)."""

    def __init__(self, cfg: PrivacyConfig, group: int = 1, state_json: str | None = None) -> None:
        if cfg.accountant != "rdp":
            raise ValueError(
                f"per-record accounting composes RDP curves; privacy.accountant must be 'rdp', not {cfg.accountant!r}"
            )
        self.cfg = cfg
        self.group = max(1, int(group))
        self.orders = list(RDP_ORDERS)
        self._unit_rdp: dict[tuple[float, float], np.ndarray] = {}
        self.rounds: list[LedgerRound] = []
        self.next_index = 0
        self.retired_below = 1  # rows with a smaller id never train again
        self.retired = 0  # rows retired by their own budget or participation count
        self.max_epsilon = 0.0  # the guarantee: the largest per-record ε of any row, ever
        self.releases = 0
        self.total_rdp = np.zeros(len(self.orders))  # every round composed: the global-history accountant
        self._pending: tuple[int, int, float, float, int, int, int] | None = None
        if state_json:
            self._load(json.loads(state_json))
        self._rdp = [self._round_rdp(r) for r in self.rounds]

    # -- state ----------------------------------------------------------------
    def _load(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or state.get("group") != self.group:
            raise ValueError(
                f"stored per-record ledger (version {state.get('version')}, group {state.get('group')}) "
                f"does not match this configuration (version {STATE_VERSION}, group {self.group}); "
                "ε cannot be carried across"
            )
        self.rounds = [
            LedgerRound(int(i), float(q), float(s), int(n), int(lo), int(hi)) for i, q, s, n, lo, hi in state["rounds"]
        ]
        self.next_index = int(state["next_index"])
        self.retired_below = int(state["retired_below"])
        self.retired = int(state["retired"])
        self.max_epsilon = float(state["max_epsilon"])
        self.releases = int(state["releases"])
        self.total_rdp = np.array(state["total_rdp"], dtype=float)

    def _state(
        self, rounds: list[LedgerRound], retired_below: int, retired: int, max_eps: float, total: np.ndarray
    ) -> str:
        return json.dumps(
            {
                "version": STATE_VERSION,
                "group": self.group,
                "next_index": rounds[-1].index + 1 if rounds else self.next_index,
                "rounds": [[r.index, r.q, r.sigma, r.steps, r.lo, r.hi] for r in rounds],
                "retired_below": retired_below,
                "retired": retired,
                "max_epsilon": max_eps,
                "releases": self.releases + 1,
                "total_rdp": [float(v) for v in total],
            }
        )

    @classmethod
    def from_global_history(
        cls, cfg: PrivacyConfig, group: int, history: list[tuple[float, float, int]], last_id: int
    ) -> RecordLedger:
        """Carry a site's old global accountant over: every row stored so far took part in every past release."""
        led = cls(cfg, group)
        for i, (sigma, q, steps) in enumerate(history):
            led.rounds.append(LedgerRound(i, float(q), float(sigma), int(steps), 1, max(1, last_id)))
            led._rdp.append(led._round_rdp(led.rounds[-1]))
            led.total_rdp = led.total_rdp + led._rdp[-1]
        led.next_index = len(history)
        led.releases = len(history)
        led.max_epsilon = led._eps(led.total_rdp)
        return led

    # -- RDP ----------------------------------------------------------------
    def _unit(self, q: float, sigma: float) -> np.ndarray:
        key = (q, sigma)
        if key not in self._unit_rdp:
            compute_rdp = opacus_module("accountants.analysis.rdp").compute_rdp
            self._unit_rdp[key] = np.asarray(
                compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=self.orders), dtype=float
            )
        return self._unit_rdp[key]

    def _round_rdp(self, r: LedgerRound) -> np.ndarray:
        return self._unit(r.q, r.sigma) * r.steps

    def _eps(self, rdp: np.ndarray) -> float:
        if not np.any(rdp):
            return 0.0
        eps, _ = opacus_module("accountants.analysis.rdp").get_privacy_spent(
            orders=self.orders, rdp=rdp, delta=self.cfg.delta
        )
        return float(eps)

    def _span(self, row_id: int) -> tuple[int, int]:
        """Positions ``[a, b)`` in ``self.rounds`` of the rounds row ``row_id`` took part in."""
        his = [r.hi for r in self.rounds]
        los = [r.lo for r in self.rounds]
        import bisect

        a = bisect.bisect_left(his, row_id)  # first round whose hi >= id (his only grow)
        b = bisect.bisect_right(los, row_id)  # rounds with lo <= id (los only grow)
        return a, max(a, b)

    def rdp_of(self, row_id: int) -> np.ndarray:
        a, b = self._span(row_id)
        if a >= b:
            return np.zeros(len(self.orders))
        return np.sum(self._rdp[a:b], axis=0)

    def rounds_of(self, row_id: int) -> list[LedgerRound]:
        """The live rounds row ``row_id`` took part in (if it is a training row)."""
        a, b = self._span(row_id)
        return self.rounds[a:b]

    def epsilon_of(self, row_id: int) -> float:
        """The ε of the training row ``row_id`` over the rounds it took part in."""
        return self._eps(self.rdp_of(row_id))

    # -- figures ----------------------------------------------------------------
    @property
    def epsilon(self) -> float:
        """The per-record guarantee: the largest ε of any row that ever existed (at the configured δ)."""
        return self.max_epsilon

    @property
    def global_epsilon(self) -> float:
        """What one accountant over every round since enrollment would report (for comparison only)."""
        return self._eps(self.total_rdp)

    def boundaries(self, lo: int, hi: int) -> list[int]:
        """Row ids in ``[lo, hi]`` where the history changes: rows from one boundary to the next share it."""
        cuts = {lo}
        for r in self.rounds:
            for c in (r.lo, r.hi + 1):
                if lo < c <= hi:
                    cuts.add(c)
        return sorted(cuts)

    # -- one round --------------------------------------------------------------
    def select(self, index: RowIndex, now: float, plan, *, max_age_s: float = 0.0, newest: int = 0) -> Selection | None:
        """The rows the next round trains on, after retiring those it would take past their limits.

        ``plan(n) -> (sample_rate, steps)`` gives the round's parameters for
        ``n`` rows; ``max_age_s`` lets rows leave by their own age; ``newest``
        (count-based, kept for old configurations) keeps only the newest N.
        None when no training row is left.
        """
        hi = index.last_id()
        lo = self.retired_below
        if max_age_s > 0:
            young = index.first_id_since(now - max_age_s)
            lo = max(lo, young if young is not None else hi + 1)
        if newest > 0:
            lo = max(lo, self._newest_lo(index, lo, hi, newest))
        start = lo
        budget, cap = self.cfg.epsilon, self.cfg.max_rounds_per_row
        for _ in range(64):  # each pass only raises lo; a handful of passes at most
            n = index.count_training(lo, hi) if hi >= lo else 0
            if n == 0:
                return None
            q, steps = plan(n)
            qu, su = group_cost(q, self.cfg.noise_multiplier, self.group)
            cost = self._unit(qu, su) * steps
            new_lo = hi + 1
            eps_at_lo = 0.0
            for cut in self.boundaries(lo, hi):
                a, b = self._span(cut)
                if cap and b - a + 1 > cap:
                    continue
                eps = self._eps(self.rdp_of(cut) + cost)
                if eps <= budget:
                    new_lo, eps_at_lo = cut, eps
                    break
            if new_lo == lo:
                break
            lo = new_lo
        else:  # pragma: no cover - lo is bounded by hi + 1
            raise RuntimeError("per-record selection did not settle")
        retiring = index.count_training(start, lo - 1) if lo > start else 0
        self._pending = (lo, hi, qu, su, steps, retiring, start)
        return Selection(
            lo=lo,
            hi=hi,
            rows=n,
            retiring=retiring,
            sample_rate=q,
            steps=steps,
            epsilon_after=max(self.max_epsilon, eps_at_lo),
        )

    def _newest_lo(self, index: RowIndex, lo: int, hi: int, newest: int) -> int:
        """The smallest id such that ``[id, hi]`` holds at most ``newest`` training rows (binary search)."""
        a, b = lo, hi + 1
        while a < b:
            mid = (a + b) // 2
            if index.count_training(mid, hi) > newest:
                a = mid + 1
            else:
                b = mid
        return a

    def state_after(self, sel: Selection) -> str:
        """The ledger state (JSON) once the round of ``sel`` is released, to store with its update."""
        if self._pending is None:
            raise ValueError("state_after needs the selection returned by the last select()")
        lo, hi, qu, su, steps, retiring, _start = self._pending
        if (lo, hi) != (sel.lo, sel.hi):
            raise ValueError("state_after needs the selection returned by the last select()")
        new = LedgerRound(self.next_index, qu, su, steps, lo, hi)
        rounds = [r for r in self.rounds if r.hi >= lo] + [new]
        total = self.total_rdp + self._round_rdp(new)
        return self._state(rounds, lo, self.retired + retiring, sel.epsilon_after, total)

    def commit(self, state_json: str) -> None:
        """Adopt a state returned by :meth:`state_after` once it is stored with its update."""
        self._load(json.loads(state_json))
        self._rdp = [self._round_rdp(r) for r in self.rounds]


def window_group(window: int, stride: int) -> int:
    """How many examples one raw sample sits in, with windows of ``window`` samples every ``stride``."""
    return max(1, math.ceil(window / max(1, stride)))
