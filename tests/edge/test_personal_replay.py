"""Noise-free training is replayable (edge/trainer.py shuffle_seed, edge/personal.py replay_seed): the same rows
train the same local-only model and fine-tune in every run; a DP round is never seeded."""

from __future__ import annotations

import numpy as np
import pytest

from edge.config import PrivacyConfig, TrainingConfig
from edge.personal import PersonalConfig, Personaliser, fine_tune, replay_seed, train_local_only
from edge.trainer import train_round
from models import build_model
from models.flat import shared_state
from models.spec import ModelSpec

CLS = ModelSpec(kind="mlp", n_features=3, hidden=[8], task="classification")


def _rows(n: int, seed: int, cut: float = 1.2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, 3)).astype(np.float32)
    y = ((x[:, 0] - x[:, 1] + 0.5 * rng.normal(size=n)) > cut).astype(np.float32).reshape(-1, 1)
    return x, y


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_seeded_noise_free_round_repeats_and_its_seed_sets_only_the_batches_order():
    x, y = _rows(48, 1)
    base = shared_state(build_model(CLS, seed=0), CLS)
    cfg = TrainingConfig(epochs=2, batch_size=8, lr=0.1, momentum=0.9, threads=1)
    run = lambda s, c=cfg: train_round(CLS, base, None, x, y, c, None, shuffle_seed=s).shared
    assert _same(run(7), run(7))  # a replay trains the same model, bit for bit
    assert not _same(run(7), run(8))  # six batches of 8 in another order: another model
    # one batch holding every row: the order cannot matter, so two seeds give the same model (up to the sum's order)
    whole = TrainingConfig(epochs=2, batch_size=48, lr=0.1, momentum=0.9, threads=1)
    a, b = run(7, whole), run(8, whole)
    assert all(np.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_dp_round_refuses_a_shuffle_seed():
    x, y = _rows(32, 2)
    base = shared_state(build_model(CLS, seed=0), CLS)
    cfg = TrainingConfig(epochs=1, batch_size=8, lr=0.1, threads=1)
    with pytest.raises(ValueError, match="never seeded"):
        train_round(CLS, base, None, x, y, cfg, PrivacyConfig(noise_multiplier=1.0, max_grad_norm=1.0), shuffle_seed=1)


def test_the_replay_seed_depends_on_the_setting_the_model_and_every_row():
    x, y = _rows(20, 3)
    s = replay_seed(0, "local", x, y)
    assert 0 <= s < 2**63 and s == replay_seed(0, "local", x.copy(), y.copy())
    x2 = x.copy()
    x2[19, 2] += 1e-3  # one value of the last row
    y2 = y.copy()
    y2[0] = 1 - y2[0]
    others = {replay_seed(1, "local", x, y), replay_seed(0, "fine_tune/0", x, y), replay_seed(0, "local", x2, y)}
    others |= {replay_seed(0, "local", x, y2), replay_seed(0, "local", x, None)}
    assert s not in others and len(others) == 5


def test_local_only_and_fine_tunes_repeat_and_repeated_fine_tunes_differ_from_each_other():
    x, y = _rows(120, 4)
    cfg = PersonalConfig(local_epochs=3, finetune_epochs=2, batch_size=16)
    local = train_local_only(CLS, x, y, cfg)
    assert _same(local, train_local_only(CLS, x, y, cfg))
    assert not _same(local, train_local_only(CLS, x[::-1].copy(), y[::-1].copy(), cfg))  # other rows' order
    one = fine_tune(CLS, local, x, y, cfg)
    assert _same(one, fine_tune(CLS, local, x, y, cfg))
    from edge import personal

    # the mean of three fine-tunes is not the first one thrice: each repeat has its own seeded order
    three = [personal._train(CLS, local, x, y, 2, cfg.finetune_lr, cfg, 0, f"fine_tune/{i}") for i in range(3)]
    assert _same(three[0], one) and not _same(three[0], three[1]) and not _same(three[1], three[2])


def test_two_personalisers_on_the_same_rows_serve_the_same_model():
    """A small site (too few validation failures: its training folds decide, edge/unit_folds.py) replayed: the
    same rows and global model give the same choice and the same served scores, as a split study's rerun does."""
    x, y = _rows(300, 5, 2.0)  # fewer than 30 failures to learn from
    xv, yv = _rows(40, 6, 2.0)  # fewer than 8 to validate on
    glob = train_local_only(CLS, *_rows(300, 7), PersonalConfig(local_epochs=2))
    cfg = PersonalConfig(local_epochs=4, finetune_epochs=2, cross_folds=3)
    runs = [Personaliser(cfg, CLS).choose(glob, x, y, xv, yv) for _ in range(2)]
    (s1, c1), (s2, c2) = runs
    assert int(y.sum()) < 30 and int(yv.sum()) < 8
    assert c1.rule.startswith("too_small_folds")  # the folds' fine-tunes and local-only models were trained too
    assert c1.to_dict() == c2.to_dict()
    assert np.array_equal(s1.predict(CLS, xv), s2.predict(CLS, xv))
