"""One local round: from the global base, E epochs of (DP-)SGD on the site's rows.

Why a fresh model per round: Opacus wraps a model with hooks and per-sample
gradient buffers; training a throw-away copy keeps the agent's own model
clean, and the round's result is only the arrays it returns. The published
delta is ``w_local − w_base`` over the shared parameters; the personal ones
(a local head) come back separately and never leave the site.

Steps and sampling rate are planned before training (``sample_rate = 1 /
ceil(n / batch_size)`` and that many steps per epoch), so the privacy budget can
be checked before a single step is taken. The accounted steps are exactly the
noised steps: the Poisson sampler is told the planned number of steps (Opacus's
own loader would run ``int(1 / q)``, one fewer for some n, e.g. 93 rows at
batch 1), an empty Poisson batch still takes a step that adds its noise (as
DP-SGD's analysis assumes), and the round counts the noise additions and
refuses to return if they differ from the plan.

Why generators of their own: the Poisson masks and the Gaussian noise are
drawn from two ``torch.Generator`` objects seeded per round from the OS CSPRNG
(``secrets``), never from torch's process-global generator, which other threads
(ONNX export, model builds) may use or seed at the same time. With
``secure_rng`` the noise is also drawn Opacus's ``secure_mode`` way (a sum of
four draws, against floating-point attacks on the sampler).

A noise-free round (``dp`` None: the plant's own local-only model and
fine-tunes, which never leave it) may instead be given a ``shuffle_seed``: its
batches' order is then a function of that seed, so a replay of the same rows
trains the same model (a split study repeats; a plant's yardstick does not
move between runs). A DP round refuses one: its sampling and noise stay
CSPRNG-drawn, as the privacy analysis needs.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from edge.config import PrivacyConfig, TrainingConfig
from edge.dpsgd import DPSGD
from fedline.opacus_parts import opacus_module
from models import ModelSpec, build_model, load_personal_state, load_shared_state, loss_per_sample
from models.flat import personal_state, shared_state, state_delta


@dataclass(frozen=True)
class Plan:
    """What a round over ``n`` rows will do, known before it starts."""

    n_samples: int
    batch_size: int
    sample_rate: float
    steps: int
    epochs: int = 1


def plan_round(n: int, cfg: TrainingConfig) -> Plan:
    """Steps and sampling rate the round will run (and account): ``ceil(n / b)`` steps per epoch at ``q = 1/that``."""
    if n < 1:
        raise ValueError(f"a round needs at least one row, got {n}")
    batch = min(cfg.batch_size, n)
    per_epoch = math.ceil(n / batch)
    return Plan(n, batch, 1.0 / per_epoch, per_epoch * cfg.epochs, cfg.epochs)


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
    noise_steps: int = 0  # optimizer steps that added Gaussian noise (== plan.steps under DP)


def preload(dp: bool) -> None:
    """Import now what the first round would otherwise import inside itself (the agent's start calls this).

    With ``dp``: Opacus's per-sample gradients and its Poisson sampler (``fedline.opacus_parts``). Not
    ``torch._dynamo``: a round's optimizer is ``edge.dpsgd.DPSGD``, not one of torch's (which import it on first
    use, about a third of the CPU an edge spent before its first update; BENCHMARKS.md, "Cheaper edge start-up").

    Nothing is computed: the same modules load, earlier, where the start's paused collector
    (``fedline.startup``) covers them and its freeze keeps them out of later collections."""
    if dp:
        for name in ("grad_sample.grad_sample_module", "utils.uniform_sampler"):
            opacus_module(name)


def private_generator() -> torch.Generator:
    """A fresh ``torch.Generator`` seeded from the OS CSPRNG: not reproducible from any fixed seed."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def poisson_batches(n: int, plan: Plan, generator: torch.Generator):
    """Opacus's Poisson sampler over ``n`` rows for one epoch, with exactly the planned steps per epoch.

    Passing ``steps`` avoids the sampler's default ``int(1 / sample_rate)``,
    which float rounding makes one less than planned for some n.
    """
    sampler = opacus_module("utils.uniform_sampler").UniformWithReplacementSampler
    return sampler(
        num_samples=n, sample_rate=plan.sample_rate, generator=generator, steps=plan.steps // max(1, plan.epochs)
    )


def evaluate(
    model: torch.nn.Module, spec: ModelSpec, x: np.ndarray, y: np.ndarray | None
) -> tuple[float | None, float | None]:
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


Batches = Callable[[], Iterable[torch.Tensor]]  # one epoch's row indices, batch by batch


def _make_private(
    model: torch.nn.Module, cfg: TrainingConfig, dp: PrivacyConfig, plan: Plan, n: int
) -> tuple[torch.nn.Module, DPSGD, Batches]:
    """DP-SGD: Opacus's per-sample gradients and Poisson batches; clipping, noise from a private generator and the
    SGD step as Opacus's ``DPOptimizer`` over torch's ``SGD`` compute them (``edge.dpsgd``)."""
    trained = opacus_module("grad_sample.grad_sample_module").GradSampleModule(
        model, batch_first=True, loss_reduction="mean"
    )
    private = DPSGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=max(1, int(n * plan.sample_rate)),
        generator=private_generator(),
        secure_mode=dp.secure_rng,
    )
    sampler = poisson_batches(n, plan, private_generator())
    return trained, private, lambda: (torch.as_tensor(idx, dtype=torch.long) for idx in sampler)


def _shuffled_batches(n: int, plan: Plan, seed: int | None = None) -> Batches:
    """Without DP: each epoch a fresh shuffle cut into batches of the planned size, from ``seed`` (a replayable
    noise-free round) or else CSPRNG-seeded."""
    order = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    return lambda: torch.randperm(n, generator=order).split(plan.batch_size)


def _run_epochs(
    trained: torch.nn.Module,
    optimizer: DPSGD,
    batches: Batches,
    spec: ModelSpec,
    data: tuple[torch.Tensor, torch.Tensor | None],
    epochs: int,
) -> list[float]:
    """The optimizer steps of every epoch; each non-empty batch's mean loss."""
    xt, yt = data
    trained.train()
    losses: list[float] = []
    params = [p for p in trained.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        # torch notes that a full backward hook (Opacus's per-sample gradients) fires on a first layer whose
        # input needs no gradient: expected, the hook reads the layer's own parameters; only that note is dropped
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        for _ in range(epochs):
            for idx in batches():
                optimizer.zero_grad(set_to_none=True)
                if len(idx) == 0:
                    # an empty Poisson batch: no gradient, but the step still adds its noise (DP-SGD's analysis
                    # counts every step); Opacus clips and noises an empty per-sample gradient to pure noise
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)  # type: ignore[attr-defined]
                    optimizer.step()
                    continue
                loss = loss_per_sample(trained, spec, xt[idx], None if yt is None else yt[idx]).mean()
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
    return losses


def train_round(
    spec: ModelSpec,
    base_shared: dict[str, np.ndarray],
    personal: dict[str, np.ndarray] | None,
    x: np.ndarray,
    y: np.ndarray | None,
    cfg: TrainingConfig,
    dp: PrivacyConfig | None,
    holdout: tuple[np.ndarray, np.ndarray | None] | None = None,
    model_seed: int = 0,
    plan: Plan | None = None,
    shuffle_seed: int | None = None,
) -> RoundResult:
    """Train from ``base_shared`` (+ the site's ``personal`` arrays) and return the delta.

    With ``dp`` set, training is DP-SGD: Opacus's Poisson sampling and per-sample gradients, then
    per-sample clipping to ``max_grad_norm`` and Gaussian noise ``noise_multiplier`` as Opacus's
    ``DPOptimizer`` computes them (``edge.dpsgd``), its randomness from private CSPRNG-seeded
    generators (module docstring).
    ``shuffle_seed`` (noise-free rounds only) fixes the batches' order so that a replay repeats.
    """
    if dp is not None and shuffle_seed is not None:
        raise ValueError("a DP round's sampling and noise are never seeded: shuffle_seed is for noise-free rounds")
    started = time.perf_counter()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    plan = plan or plan_round(len(x), cfg)  # a given plan: q and steps fixed by the schedule (plan_rows)
    model = build_model(spec, seed=model_seed)
    load_shared_state(model, spec, base_shared)
    if personal:
        load_personal_state(model, spec, personal)
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    yt = None if y is None else torch.from_numpy(np.ascontiguousarray(y, np.float32))
    trained: torch.nn.Module = model
    if dp is not None:
        trained, optimizer, batches = _make_private(model, cfg, dp, plan, len(x))
    else:
        optimizer = DPSGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)  # no noise: torch's SGD
        batches = _shuffled_batches(len(x), plan, shuffle_seed)
    losses = _run_epochs(trained, optimizer, batches, spec, (xt, yt), cfg.epochs)
    noise_steps = optimizer.noise_steps
    if dp is not None and noise_steps != plan.steps:
        raise RuntimeError(f"round ran {noise_steps} noised steps but {plan.steps} are accounted; not released")
    if dp is not None:
        trained._close()  # type: ignore[operator]  # Opacus's GradSampleModule: remove its hooks
    shared = shared_state(model, spec)
    result_personal = personal_state(model, spec)
    h_loss, h_acc = evaluate(model, spec, *holdout) if holdout is not None else (None, None)
    return RoundResult(
        delta=state_delta(shared, base_shared),
        shared=shared,
        personal=result_personal,
        plan=plan,
        train_loss=float(np.mean(losses)) if losses else float("nan"),
        holdout_loss=h_loss,
        holdout_accuracy=h_acc,
        seconds=time.perf_counter() - started,
        noise_steps=noise_steps,
    )
