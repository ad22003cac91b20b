"""One local round: from the global base, E epochs of (DP-)SGD on the site's rows.

Why a fresh model per round: Opacus wraps a model with hooks and per-sample
gradient buffers; training a throw-away copy keeps the agent's own model
clean, and the round's result is only the arrays it returns. The published
delta is ``w_local − w_base`` over the shared parameters; the personal ones
(a local head) come back separately and never leave the site.

Steps and sampling rate are planned before training (Opacus's Poisson loader
takes ``sample_rate = 1 / ceil(n / batch_size)`` and that many steps per epoch),
so the privacy budget can be checked before a single step is taken, and the
accounted steps are exactly those planned.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from edge.config import PrivacyConfig, TrainingConfig
from models import ModelSpec, build_model, load_personal_state, load_shared_state, loss_per_sample
from models.flat import personal_state, shared_state, state_delta


@dataclass(frozen=True)
class Plan:
    """What a round over ``n`` rows will do, known before it starts."""

    n_samples: int
    batch_size: int
    sample_rate: float
    steps: int


def plan_round(n: int, cfg: TrainingConfig) -> Plan:
    """Steps and sampling rate as Opacus's DP data loader will use them."""
    batch = min(cfg.batch_size, n)
    per_epoch = math.ceil(n / batch)
    return Plan(n, batch, 1.0 / per_epoch, per_epoch * cfg.epochs)


@dataclass
class RoundResult:
    """A finished round: arrays to publish and keep, and the figures to report."""

    delta: dict[str, np.ndarray]
    shared: dict[str, np.ndarray]
    personal: dict[str, np.ndarray]
    plan: Plan
    train_loss: float
    holdout_loss: float | None
    holdout_accuracy: float | None
    seconds: float


def evaluate(model: torch.nn.Module, spec: ModelSpec, x: np.ndarray, y: np.ndarray | None) -> tuple[float | None, float | None]:
    """Mean loss and (for classification) accuracy at 0.5 on held-out rows."""
    if len(x) == 0:
        return None, None
    model.eval()
    with torch.no_grad():
        xt = torch.from_numpy(x)
        yt = None if y is None else torch.from_numpy(y)
        loss = float(loss_per_sample(model, spec, xt, yt).mean())
        acc = None
        if spec.task == "classification" and yt is not None:
            acc = float(((model(xt) > 0).float() == yt).float().mean())
    return loss, acc


def train_round(spec: ModelSpec, base_shared: dict[str, np.ndarray], personal: dict[str, np.ndarray] | None,
                x: np.ndarray, y: np.ndarray | None, cfg: TrainingConfig, dp: PrivacyConfig | None,
                holdout: tuple[np.ndarray, np.ndarray | None] | None = None, model_seed: int = 0) -> RoundResult:
    """Train from ``base_shared`` (+ the site's ``personal`` arrays) and return the delta.

    With ``dp`` set, training is DP-SGD through Opacus (Poisson sampling,
    per-sample clipping to ``max_grad_norm``, Gaussian noise ``noise_multiplier``).
    """
    started = time.perf_counter()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    plan = plan_round(len(x), cfg)
    model = build_model(spec, seed=model_seed)
    load_shared_state(model, spec, base_shared)
    if personal:
        load_personal_state(model, spec, personal)
    tensors = [torch.from_numpy(np.ascontiguousarray(x, np.float32))]
    if y is not None:
        tensors.append(torch.from_numpy(np.ascontiguousarray(y, np.float32)))
    data = torch.utils.data.TensorDataset(*tensors)
    loader = torch.utils.data.DataLoader(data, batch_size=plan.batch_size, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    trained: torch.nn.Module = model
    if dp is not None:
        from opacus import PrivacyEngine

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the "secure RNG off" advice is a config choice, logged at start-up
            engine = PrivacyEngine(accountant=dp.accountant, secure_mode=dp.secure_rng)
            trained, optimizer, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm, poisson_sampling=True,
            )
    trained.train()
    losses: list[float] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # backward-hook notes from Opacus on input layers
        for _ in range(cfg.epochs):
            for batch in loader:
                xb = batch[0]
                yb = batch[1] if len(batch) > 1 else None
                if len(xb) == 0:  # Poisson sampling can draw an empty batch; its step is still accounted
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss = loss_per_sample(trained, spec, xb, yb).mean()
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
    if dp is not None:
        trained._close()  # remove Opacus hooks before reading and evaluating
    shared = shared_state(model, spec)
    result_personal = personal_state(model, spec)
    h_loss, h_acc = evaluate(model, spec, *holdout) if holdout is not None else (None, None)
    return RoundResult(
        delta=state_delta(shared, base_shared), shared=shared, personal=result_personal, plan=plan,
        train_loss=float(np.mean(losses)) if losses else float("nan"),
        holdout_loss=h_loss, holdout_accuracy=h_acc, seconds=time.perf_counter() - started,
    )
