"""Local dataset, outbox and privacy budget: on-disk behaviour, bounds, restarts."""

from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from edge.config import PrivacyConfig, TrainingConfig
from edge.dataset import Dataset
from edge.outbox import Outbox, OutboxFull, read_ledger
from edge.privacy import PrivacyBudget
from edge.trainer import plan_round


def test_dataset_is_bounded_keeps_newest_and_survives_reopen(tmp_path) -> None:
    path = tmp_path / "d.sqlite"
    ds = Dataset(path, (3,), 1, max_rows=100, holdout_fraction=0.2)
    for i in range(250):
        ds.add(np.full(3, i, np.float32), np.array([i % 2]))
    assert len(ds) == 100
    assert ds.evicted == 150
    train, hold = ds.counts()
    assert train + hold == 100 and 5 <= hold <= 40
    ds.close()
    again = Dataset(path, (3,), 1, max_rows=100, holdout_fraction=0.2)
    x, y = again.arrays()
    xh, _ = again.arrays(holdout=True)
    kept = sorted({int(v) for v in np.concatenate([x[:, 0], xh[:, 0]])})
    assert kept == list(range(150, 250))  # oldest evicted first
    assert not set(x[:, 0]) & set(xh[:, 0])  # no example on both sides
    assert np.all(np.diff(x[:, 0]) > 0)  # oldest first
    assert y.shape == (len(x), 1)
    newest, _ = again.arrays(newest=10)
    assert list(newest[:, 0]) == sorted(x[:, 0])[-10:]
    with pytest.raises(ValueError, match="shape"):
        again.add(np.zeros(4), np.array([0]))
    again.close()


def test_dataset_windows_without_labels(tmp_path) -> None:
    ds = Dataset(tmp_path / "w.sqlite", (5, 2), None, max_rows=10, holdout_fraction=0.0)
    ds.add_many([(np.ones((5, 2)) * i, None) for i in range(4)])
    x, y = ds.arrays()
    assert x.shape == (4, 5, 2) and y is None


def _put(ob: Outbox, counter: int, size: int = 100, **kw) -> list:
    return ob.put(
        site="s",
        counter=counter,
        msg_id=f"m{counter}",
        base_version=0,
        n_samples=10,
        epsilon=0.1,
        blob=bytes([counter % 256]) * size,
        **kw,
    )


def test_outbox_keeps_rows_until_receipt_and_survives_reopen(tmp_path) -> None:
    ob = Outbox(tmp_path / "o.sqlite", max_bytes=10_000, max_count=10)
    _put(ob, 1, meta={"accountant": "A1"})
    _put(ob, 2)
    with pytest.raises(ValueError, match="does not follow"):
        _put(ob, 5)
    assert [r.counter for r in ob.pending(900)] == [1, 2]
    ob.mark_sent("m1")
    assert [r.counter for r in ob.pending(900)] == [2]  # sent, waiting for its receipt
    assert [r.counter for r in ob.pending(0, now=10**10)] == [1, 2]  # no receipt for too long: again
    ob.close()
    ob = Outbox(tmp_path / "o.sqlite", max_bytes=10_000, max_count=10)
    assert ob.last_counter() == 2 and ob.get_meta("accountant") == "A1"
    assert [r.counter for r in ob.pending(900)] == [2]  # a restart does not resend what was sent
    assert ob.settle(1, "m1", "applied", None, 3)
    assert not ob.settle(1, "m1", "applied", None, 3)  # a duplicate receipt finds nothing
    assert not ob.settle(2, "wrong-id", "applied", None, 3)
    assert ob.settle(2, "m2", "stale", "too old", 9)
    assert ob.depth() == (0, 0)
    states = [(e.counter, e.state, e.reason, e.version) for e in ob.ledger()]
    assert states == [(1, "applied", None, 3), (2, "stale", "too old", 9)]
    assert read_ledger(tmp_path / "o.sqlite") == ob.ledger()  # read-only, beside a running agent


def test_a_receipt_for_an_update_refused_before_its_header_settles_by_msg_id(tmp_path) -> None:
    """Issue 14: a bad signature or unknown key (a key rotation, a revocation) gets a receipt with counter -1;
    it must take the row out of the outbox, or the row is resent forever and blocks max_in_flight."""
    ob = Outbox(tmp_path / "o.sqlite", max_bytes=10_000, max_count=10)
    _put(ob, 1)
    _put(ob, 2)
    assert not ob.settle(-1, "m9", "rejected", "signature", 0)  # another update's id: nothing
    assert ob.settle(-1, "m1", "rejected", "signature", 0)
    assert [r.counter for r in ob.pending(900)] == [2]
    first = ob.ledger()[0]
    assert (first.counter, first.state, first.reason) == (1, "rejected", "signature")


def test_a_buffered_update_superseded_by_the_same_site_ends_stale_in_the_ledger(tmp_path) -> None:
    ob = Outbox(tmp_path / "o.sqlite", max_bytes=10_000, max_count=10)
    _put(ob, 1)
    assert ob.settle(1, "m1", "buffered", None, 0)
    assert not ob.settle(1, "m1", "stale", "superseded", 0)  # the row already left; the ledger follows
    assert [(e.state, e.reason) for e in ob.ledger()] == [("stale", "superseded")]


def test_outbox_drop_oldest_and_stop_training(tmp_path) -> None:
    ob = Outbox(tmp_path / "a.sqlite", max_bytes=350, max_count=10, policy="drop_oldest")
    for c in (1, 2, 3):
        assert _put(ob, c) == []
    dropped = _put(ob, 4)
    assert [d.counter for d in dropped] == [1]
    assert [r.counter for r in ob.pending(900)] == [2, 3, 4]
    assert ob.ledger()[0].state == "dropped"
    stop = Outbox(tmp_path / "b.sqlite", max_bytes=10_000, max_count=2, policy="stop_training")
    _put(stop, 1, meta={"accountant": "A1"})
    _put(stop, 2, meta={"accountant": "A2"})
    assert stop.is_full()
    with pytest.raises(OutboxFull):
        _put(stop, 3, meta={"accountant": "A3"})
    # the refused release left no trace: counter and accountant are unchanged
    assert stop.last_counter() == 2 and stop.get_meta("accountant") == "A2"


@pytest.mark.parametrize(
    "mechanism, cls, sizes", [("rdp", RDPAccountant, (500, 800)), ("prv", PRVAccountant, (500,))]
)  # PRV: ~1 s per ε
def test_budget_matches_opacus_and_persists(mechanism, cls, sizes) -> None:
    cfg = PrivacyConfig(epsilon=20.0, delta=1e-5, noise_multiplier=1.1, accountant=mechanism)
    budget = PrivacyBudget(cfg)
    assert budget.epsilon == 0.0
    reference = cls()
    for n in sizes:
        plan = plan_round(n, TrainingConfig(batch_size=50, epochs=1))
        state = budget.state_after(plan.sample_rate, plan.steps)
        expected_next = budget.epsilon_after(plan.sample_rate, plan.steps)
        budget.commit(state)
        for _ in range(plan.steps):
            reference.step(noise_multiplier=1.1, sample_rate=plan.sample_rate)
        assert budget.epsilon == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-6)
        assert budget.epsilon == pytest.approx(expected_next, rel=1e-9)
        budget = PrivacyBudget(cfg, state)  # as after a restart
    assert budget.allows(0.01, 1) and budget.epsilon_after(0.01, 1) > budget.epsilon
    assert not budget.allows(0.5, 50)  # ε ≈ 22 with either accountant


def test_budget_refuses_history_of_another_accountant() -> None:
    rdp = PrivacyBudget(PrivacyConfig(accountant="rdp"))
    state = rdp.state_after(0.1, 10)
    with pytest.raises(ValueError, match="accountant"):
        PrivacyBudget(PrivacyConfig(accountant="prv"), state)


def test_plan_matches_opacus_dp_loader() -> None:
    """Steps and sampling rate are what Opacus's Poisson loader will do."""
    import torch
    from opacus.data_loader import DPDataLoader

    data = torch.utils.data.TensorDataset(torch.zeros(1003, 2))
    loader = DPDataLoader.from_data_loader(torch.utils.data.DataLoader(data, batch_size=64))
    plan = plan_round(1003, TrainingConfig(batch_size=64, epochs=3))
    assert plan.sample_rate == pytest.approx(loader.sample_rate)
    assert plan.steps == 3 * len(loader)
