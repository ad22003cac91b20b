"""DP you can trust (issue 13, item 4): private CSPRNG-seeded randomness, accounted steps == noised steps."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from edge.config import PrivacyConfig, TrainingConfig
from edge.trainer import plan_round, poisson_batches, private_generator, train_round
from models import ModelSpec, build_model, export_onnx
from models.flat import shared_state

SPEC = ModelSpec(kind="mlp", n_features=3, hidden=[8])
N_PARAMS = 4  # body.0.weight, body.0.bias, head.weight, head.bias: each step noises each once


def _data(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 3), dtype=np.float32), (rng.random((n, 1)) > 0.5).astype(np.float32)


@pytest.fixture
def noise_log(monkeypatch):
    """Every Gaussian noise tensor a round's DP-SGD step adds (``edge.dpsgd.DPSGD._noise``, Opacus's
    ``_generate_noise`` draw for draw; observed, passed through unchanged)."""
    from edge.dpsgd import DPSGD

    seen: list[torch.Tensor] = []
    real = DPSGD._noise

    def observe(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        seen.append(out.detach().clone())
        return out

    monkeypatch.setattr(DPSGD, "_noise", observe)
    return seen


def test_accounted_steps_equal_the_sampler_steps_for_every_n() -> None:
    """Every n from 1 to 10,000 at three batch sizes: the sampler the round uses runs exactly the planned
    (accounted) steps per epoch; Opacus's default int(1/q) would run one fewer for some n."""
    short = 0
    for batch in (1, 64, 256):
        cfg = TrainingConfig(batch_size=batch, epochs=2)
        for n in range(1, 10_001):
            plan = plan_round(n, cfg)
            per_epoch = -(-n // min(batch, n))
            assert plan.steps == 2 * per_epoch and plan.sample_rate == 1.0 / per_epoch
            assert len(poisson_batches(n, plan, torch.Generator())) == per_epoch
            short += int(1 / plan.sample_rate) != per_epoch
    assert short > 0  # the case the explicit step count exists for (e.g. n = 93 at batch 1)


@pytest.mark.parametrize("n, batch", [(1, 1), (2, 1), (7, 1), (93, 1), (99, 1), (5, 64), (130, 64), (1000, 256)])
def test_noised_steps_equal_accounted_steps_including_empty_batches(n, batch, noise_log) -> None:
    """Real rounds: each accounted step adds noise once per parameter, an empty Poisson batch too."""
    x, y = _data(n)
    cfg = TrainingConfig(batch_size=batch, epochs=2)
    base = shared_state(build_model(SPEC), SPEC)
    result = train_round(SPEC, base, None, x, y, cfg, PrivacyConfig(), None)
    assert result.noise_steps == result.plan.steps == plan_round(n, cfg).steps
    assert len(noise_log) == result.plan.steps * N_PARAMS


def test_empty_batches_still_add_noise() -> None:
    """q = 1/93 over 93 rows at batch 1: about a third of the 93 batches are empty; counting the sampler's
    empty batches with the same draws shows they happened, and the round still noised every step."""
    n = 93
    plan = plan_round(n, TrainingConfig(batch_size=1))
    gen = torch.Generator().manual_seed(5)
    empty = sum(1 for idx in poisson_batches(n, plan, gen) if len(idx) == 0)
    assert empty > 10
    x, y = _data(n)
    result = train_round(
        SPEC, shared_state(build_model(SPEC), SPEC), None, x, y, TrainingConfig(batch_size=1), PrivacyConfig(), None
    )
    assert result.noise_steps == plan.steps == 93


def test_noise_is_private_while_models_are_built_and_exported(noise_log) -> None:
    """DP rounds in one thread while another builds and exports models (the old build seeded torch's global
    generator with 0): the global generator is never touched, no two steps repeat noise, two identical rounds
    draw different noise, and no generator seeded with 0..999 (or torch's global one at seed 0) reproduces it."""
    x, y = _data(400)
    base = shared_state(build_model(SPEC), SPEC)
    stop = threading.Event()
    built = [0]

    def churn() -> None:
        while not stop.is_set():
            export_onnx(build_model(SPEC, seed=0), SPEC)
            built[0] += 1

    torch.manual_seed(1234)
    global_before = torch.get_rng_state()
    worker = threading.Thread(target=churn)
    worker.start()
    try:
        runs = [
            train_round(SPEC, base, None, x, y, TrainingConfig(batch_size=32, epochs=2), PrivacyConfig(), None)
            for _ in range(2)
        ]
    finally:
        stop.set()
        worker.join()
    assert built[0] >= 1
    assert torch.equal(torch.get_rng_state(), global_before)  # nothing drew from or seeded the global RNG
    steps = runs[0].plan.steps
    per_step = [
        torch.cat([t.flatten() for t in noise_log[i * N_PARAMS : (i + 1) * N_PARAMS]]) for i in range(2 * steps)
    ]
    flat = torch.stack(per_step)
    assert len({tuple(v.tolist()) for v in flat}) == len(per_step)  # never repeated across steps or rounds
    assert not torch.allclose(flat[0], flat[steps])  # the same round twice: different noise
    first = noise_log[0]
    std = PrivacyConfig().noise_multiplier * PrivacyConfig().max_grad_norm
    candidates = [torch.Generator().manual_seed(s) for s in range(1000)]
    torch.manual_seed(0)
    for gen in [*candidates, None]:
        draw = torch.normal(0.0, std, size=first.shape, generator=gen)
        assert not torch.allclose(draw, first)
    a, b = private_generator(), private_generator()
    assert not torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))
