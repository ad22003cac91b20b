"""Per-record privacy accounting (issue 21): each row's ε over its own rounds, checked against Opacus.

The simulated streams drive the real ``RecordLedger`` with the real round plan
(``plan_round``) over an in-memory index of rows arriving at 1 Hz (the
ledger only needs ids, timestamps and the held-out split, which is the
dataset's own hash). The agent tests use the real SQLite dataset and outbox.
"""

from __future__ import annotations

import functools

import pytest

from edge.config import PrivacyConfig, TrainingConfig
from edge.dataset import _is_holdout
from edge.ledger_privacy import RecordLedger, group_cost, window_group
from edge.privacy_stream import StreamIndex, simulate_stream
from edge.trainer import plan_round

DELTA = 1e-5


def _plan(batch: int):
    cfg = TrainingConfig(batch_size=batch)

    def plan(n: int) -> tuple[float, int]:
        p = plan_round(n, cfg)
        return p.sample_rate, p.steps

    return plan


@pytest.fixture
def opacus_epsilon(monkeypatch):
    """Opacus's own RDP accountant fed one history; ``compute_rdp`` memoised (a pure function) for speed."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    raw = analysis.compute_rdp
    cached = functools.lru_cache(maxsize=None)(
        lambda q, s, n, orders: raw(q=q, noise_multiplier=s, steps=n, orders=list(orders))
    )
    monkeypatch.setattr(
        analysis,
        "compute_rdp",
        lambda *, q, noise_multiplier, steps, orders: cached(q, noise_multiplier, steps, tuple(orders)),
    )

    @functools.cache
    def eps(history: tuple[tuple[float, float, int], ...]) -> float:
        if not history:
            return 0.0
        acc = RDPAccountant()
        acc.history = list(history)  # (noise_multiplier, sample_rate, steps) per round, as acc.step() keeps them
        return float(acc.get_epsilon(delta=DELTA))

    return eps


def _run_stream(
    ledger: RecordLedger, index: StreamIndex, rounds: int, every_s: float, window_s: float, batch: int, on_leave=None
) -> list[tuple[int, int, float, int]]:
    """Time-based rounds over the stream; returns each round's ``(lo, hi, q, steps)`` as trained."""
    plan = _plan(batch)
    done: list[tuple[int, int, float, int]] = []
    prev_lo = 1
    for r in range(1, rounds + 1):
        t = r * every_s
        index.now = int(t)
        sel = ledger.select(index, t, plan, max_age_s=window_s)
        assert sel is not None and sel.rows > 0, f"round {r}: no row left to train on"
        if on_leave is not None and sel.lo > prev_lo:
            on_leave(prev_lo, sel.lo - 1, done)  # rows leaving now, before the ledger forgets their rounds
        ledger.commit(ledger.state_after(sel))
        done.append((sel.lo, sel.hi, sel.sample_rate, sel.steps))
        assert ledger.epsilon <= ledger.cfg.epsilon
        prev_lo = sel.lo
    return done


@pytest.mark.parametrize("days", [3, pytest.param(30, marks=pytest.mark.slow)])
def test_stream_matches_opacus_for_every_row(opacus_epsilon, days) -> None:
    """``days`` at 1 Hz, a round every 1,000 s, a 50,000 s sliding window, budget 3.5 (rows also retire by
    budget): every row's ε, from the ledger, equals Opacus's RDP accountant over that row's own rounds."""
    budget, every, window, batch = 3.5, 1000.0, 50_000.0, 64
    rounds = days * 86_400 // int(every)
    index = StreamIndex(rounds * int(every) + 10, holdout_fraction=0.1)
    ledger = RecordLedger(PrivacyConfig(epsilon=budget, delta=DELTA, noise_multiplier=1.0))
    reported: dict[int, float] = {}  # first training id of a group of rows with one history -> ledger's ε

    def groups(lo: int, hi: int, done) -> list[int]:
        """Rows with identical histories, worked out from the rounds as run (not from the ledger)."""
        cuts = {lo} | {c for a, b, _, _ in done for c in (a, b + 1) if lo < c <= hi}
        reps = []
        for start, end in zip(sorted(cuts), [*sorted(cuts)[1:], hi + 1]):
            first = next((i for i in range(start, end) if index.training[i]), None)
            if first is not None:
                reps.append(first)
        return reps

    def on_leave(lo: int, hi: int, done) -> None:
        for rep in groups(lo, hi, done):
            reported[rep] = ledger.epsilon_of(rep)

    done = _run_stream(ledger, index, rounds, every, window, batch, on_leave)
    on_leave(done[-1][0], done[-1][1], done)  # the rows still in the window at the end
    assert ledger.retired > 0  # the budget retired rows, not only their age
    assert len(reported) > 2 * rounds // 3

    worst = 0.0
    for rep, eps in reported.items():
        history = tuple((1.0, q, steps) for lo, hi, q, steps in done if lo <= rep <= hi)
        expected = opacus_epsilon(history)
        assert eps == pytest.approx(expected, abs=1e-9), f"row {rep}: ledger {eps}, Opacus {expected}"
        assert expected <= budget
        worst = max(worst, expected)
    assert ledger.epsilon == pytest.approx(worst, abs=1e-9)  # the reported guarantee: the max over rows


@pytest.mark.slow
def test_thousand_rounds_keep_publishing_where_the_global_accountant_stops(opacus_epsilon) -> None:
    """1,000 rounds (compressed time) on a 50,000-row window: the per-record ε is flat once the window is
    full and within budget to the end; one accountant over the site's history passes the budget early."""
    budget, every, window, batch = 5.0, 1000.0, 50_000.0, 64
    index = StreamIndex(1000 * int(every) + 10, holdout_fraction=0.0)
    ledger = RecordLedger(PrivacyConfig(epsilon=budget, delta=DELTA, noise_multiplier=1.0))
    plan = _plan(batch)
    per_record, global_eps, history = [], [], []
    for r in range(1, 1001):
        index.now = r * int(every)
        sel = ledger.select(index, r * every, plan, max_age_s=window)
        assert sel is not None and sel.rows >= 1000
        ledger.commit(ledger.state_after(sel))
        per_record.append(ledger.epsilon)
        global_eps.append(ledger.global_epsilon)
        history.append((1.0, sel.sample_rate, sel.steps))
    stop = next(i + 1 for i, e in enumerate(global_eps) if e > budget)
    print(f"global-history accountant passes ε {budget} at round {stop}; per-record ε {per_record[-1]:.4f}")
    assert stop < 1000
    assert max(per_record) <= budget
    assert per_record[-1] == per_record[100]  # flat: no round after the window filled raised any row's ε
    # the global figure is the plain composition of every round: Opacus over the whole history
    assert global_eps[-1] == pytest.approx(opacus_epsilon(tuple(history)), abs=1e-9)
    assert global_eps[stop - 1] == pytest.approx(opacus_epsilon(tuple(history[:stop])), abs=1e-9)


def test_group_accounting_for_overlapping_windows_by_hand() -> None:
    """One raw sample in k windows: sampled if any of its k examples is (1 - (1-q)^k), sensitivity k·C."""
    assert window_group(16, 1) == 16 and window_group(16, 16) == 1 and window_group(16, 5) == 4
    q, sigma = group_cost(0.1, 1.2, 3)
    assert q == pytest.approx(1 - 0.9**3) == pytest.approx(0.271)
    assert sigma == pytest.approx(0.4)
    assert group_cost(0.1, 1.2, 1) == (0.1, 1.2)
    single = RecordLedger(PrivacyConfig(epsilon=1e6), group=1)
    grouped = RecordLedger(PrivacyConfig(epsilon=1e6), group=2)
    index = StreamIndex(2000, holdout_fraction=0.0)
    index.now = 2000
    a = single.select(index, 2000.0, _plan(64))
    b = grouped.select(index, 2000.0, _plan(64))
    assert a is not None and b is not None and b.epsilon_after > 2 * a.epsilon_after


def test_rows_retire_by_their_own_budget_and_new_rows_keep_the_site_going() -> None:
    """All rows at once, then no row left with budget: the round is refused; new rows train again."""
    ledger = RecordLedger(PrivacyConfig(epsilon=3.0, noise_multiplier=1.5))
    index = StreamIndex(10_000, holdout_fraction=0.1)
    index.now = 1000
    plan = _plan(32)
    released = 0
    while (sel := ledger.select(index, 1000.0, plan)) is not None:
        ledger.commit(ledger.state_after(sel))
        released += 1
    assert released >= 2 and ledger.epsilon <= 3.0
    index.now = 3000  # 2,000 new rows arrive: they have their whole budget (and lower q lets old ones in again)
    while (sel := ledger.select(index, 3000.0, plan)) is not None and sel.lo <= 1000:
        ledger.commit(ledger.state_after(sel))
    assert sel is not None and sel.lo > 1000  # the first rows are spent, the site goes on with the new ones
    ledger.commit(ledger.state_after(sel))
    assert ledger.retired >= index.count_training(1, 1000)
    assert ledger.epsilon <= 3.0 and 0 < ledger.epsilon_of(sel.lo) <= 3.0


def test_participation_cap_and_state_survive_a_restart() -> None:
    cfg = PrivacyConfig(epsilon=50.0, max_rounds_per_row=2)
    ledger = RecordLedger(cfg)
    index = StreamIndex(10_000, holdout_fraction=0.0)
    plan = _plan(64)
    for t in (1000, 2000, 3000):
        index.now = t
        sel = ledger.select(index, float(t), plan)
        state = ledger.state_after(sel)
        ledger.commit(state)
    assert sel.lo == 1001  # rows 1..1000 had their two rounds
    again = RecordLedger(cfg, state_json=state)
    assert again.epsilon == ledger.epsilon and again.retired == 1000
    assert again.epsilon_of(1500) == ledger.epsilon_of(1500) > 0
    with pytest.raises(ValueError, match="group"):
        RecordLedger(cfg, group=4, state_json=state)
    with pytest.raises(ValueError, match="rdp"):
        RecordLedger(PrivacyConfig(accountant="prv"))


def test_stream_index_holds_out_what_the_dataset_holds_out() -> None:
    index = StreamIndex(2000, holdout_fraction=0.1)
    index.now = 2000
    assert all(bool(index.training[i]) == (not _is_holdout(i, 0.1)) for i in range(1, 2001))
    assert index.count_training(1, 2000) == sum(not _is_holdout(i, 0.1) for i in range(1, 2001))
    assert index.first_id_since(1500.5) == 1501 and index.first_id_since(2500) is None


def test_simulated_stream_report_for_the_demo() -> None:
    """The demo's long-stream figures: per-record ε flat within budget, the global accountant's stop round."""
    rep = simulate_stream(PrivacyConfig(epsilon=4.5, delta=DELTA), batch_size=64, rounds=200)
    assert rep.global_stops_at_round is not None and rep.global_stops_at_round < 200
    assert rep.global_epsilon > 4.5 >= rep.per_record_epsilon == rep.per_record_epsilon_at_half > 0


def test_demo_stream_extension_equals_the_full_simulation() -> None:
    """The demo's cheap long stream (150 rounds simulated, then the steady round's RDP added) gives the
    same figures as running every round through the ledger."""
    from edge.privacy_stream import demo_stream

    cheap = demo_stream(4.5, DELTA, 1.0, rounds=260, simulated=120)
    full = demo_stream(4.5, DELTA, 1.0, rounds=260, simulated=260)
    assert cheap["global_stops_at_round"] == full["global_stops_at_round"] is not None
    assert cheap["global_epsilon"] == pytest.approx(full["global_epsilon"], abs=1e-9)
    assert cheap["per_record_epsilon"] == full["per_record_epsilon"] <= 4.5
