"""The server-side L2 bound on a delta, derived from the federation's DP settings.

Why derived rather than a free number: a DP-SGD step moves the weights by
``lr`` times the mean of per-sample gradients clipped to ``C``, plus Gaussian
noise of standard deviation ``σ C / B`` per coordinate (Opacus divides the
noised sum by the expected batch size ``B``). Over ``T`` steps (with SGD
momentum ``β`` a gradient is applied ``1 / (1 − β)`` times at most), an honest
delta of a model with ``d`` shared parameters is bounded by

    ‖Δ‖ ≤ lr · C · T / (1 − β)                       (clipped gradients, all aligned)
        + lr · σ · C · √(d · T) / (B · (1 − β))      (expected norm of the summed noise)

(the noise of T independent steps adds in quadrature: its expected norm is
about ``σ C √(d T) / B`` before the learning rate). An update longer than this
did not come from the federation's training: it is clipped to the bound
(``[strategy] norm_bound``), and one longer than ``MAX_NORM_FACTOR`` times the
bound is refused (``[validation] max_norm``). Both can be set explicitly;
``norm_bound = 0`` turns clipping off.
"""

from __future__ import annotations

import math

from aggregator.config import AggregatorConfig, DPConfig

MAX_NORM_FACTOR = 4.0  # max_norm when unset: refuse what no honest training of these settings could produce


def honest_bound(dp: DPConfig, n_params: int) -> float:
    """The L2 bound above for ``n_params`` shared parameters."""
    if n_params < 1:
        raise ValueError("the model has no shared parameters")
    damp = 1.0 / (1.0 - dp.momentum)
    signal = dp.lr * dp.clip_norm * dp.steps * damp
    noise = dp.lr * dp.noise_multiplier * dp.clip_norm * math.sqrt(n_params * dp.steps) / dp.batch_size * damp
    return signal + noise


def effective_bounds(cfg: AggregatorConfig, n_params: int) -> tuple[float, float]:
    """(norm_bound, max_norm) in force: the configured values, else those derived from ``[dp]``."""
    derived = honest_bound(cfg.dp, n_params)
    bound = derived if cfg.strategy.norm_bound is None else cfg.strategy.norm_bound
    if cfg.validation.max_norm is not None:
        max_norm = cfg.validation.max_norm
    else:
        max_norm = MAX_NORM_FACTOR * (bound if bound > 0 else derived)
    return bound, max_norm


def dp_table(
    site_rows_and_batches: list[tuple[int, int]],
    *,
    epochs: int,
    lr: float,
    momentum: float,
    clip_norm: float,
    noise_multiplier: float,
) -> dict[str, float | int]:
    """The aggregator's ``[dp]`` table for sites that train ``epochs`` over (rows, batch) each.

    The most steps any site takes (``epochs · ceil(rows / batch)``) and the smallest batch (the
    largest noise per step) make the bound hold for every site. For generated configs (demo, bench).
    """
    steps = max(epochs * math.ceil(n / max(1, min(b, n))) for n, b in site_rows_and_batches)
    batch = min(max(1, min(b, n)) for n, b in site_rows_and_batches)
    return {
        "clip_norm": clip_norm,
        "noise_multiplier": noise_multiplier,
        "lr": lr,
        "momentum": momentum,
        "batch_size": batch,
        "steps": steps,
    }
