"""Version 0 without torch: the parameters ``models.nets.build_model(spec, seed)`` makes, bit for bit, in numpy.

Why: the aggregator builds version 0 from the seed, and every edge builds the same version 0 and takes it
without a download when its encoding has the signed manifest's weights hash (``edge.follow``). Importing
torch only for that cost the aggregator's start most of its CPU and about 250 MB (BENCHMARKS.md, issue 19),
on the path every site waits on. An edge trains with torch and keeps building its models with it.

What torch computes, and what this module computes the same way:

- ``torch.Generator().manual_seed(seed)`` is a Mersenne Twister (MT19937) seeded with ``init_genrand(seed)``
  for a seed below 2**32; NumPy's legacy ``RandomState(seed)`` is the same generator with the same seeding,
  and its stream is frozen by NumPy's compatibility policy (NEP 19). ``randint(0, 2**32, dtype=uint32)``
  returns its 32-bit outputs one per value (the full range needs no rejection).
- ``Tensor.uniform_(a, b, generator)`` on a float32 CPU tensor takes one 32-bit output per element, in memory
  order, keeps its low 24 bits ``k`` (float's digits) and returns ``k * 2**-24 * (b' - a') + a'`` with ``a'``,
  ``b'`` the bounds cast to float32, rounded once to float32. With ``a' = -b'`` (every bound here) that value is
  exact in float64 (an integer below 2**48 times a power of two), so computing it in float64 and rounding once
  gives torch's result whether its kernel fuses the multiply-add or works in double.
- ``build_model``'s ``_initialise`` walks the modules in order and fills each ``Linear`` / ``Conv1d`` weight with
  ``kaiming_uniform_(a=sqrt(5))`` (bound ``sqrt(3) * gain / sqrt(fan_in)``, ``gain = sqrt(2 / (1 + a**2))``,
  the same Python float expressions as ``torch.nn.init``), then its bias with ``U(±1 / sqrt(fan_in))``.

Covered: kinds ``mlp``, ``autoencoder`` and ``cnn1d`` with a seed in ``[0, 2**32)``; :func:`seed_params` returns
None otherwise (a GRU: Opacus's DPGRU) and the caller builds with torch (``models.version0``).
``tests/models/test_seed_init.py`` checks every covered kind against ``build_model`` bit for bit. No torch
import here (an import-linter contract).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np

from models.spec import ModelSpec

KINDS = ("mlp", "autoencoder", "cnn1d")
_DIGITS = 24  # std::numeric_limits<float>::digits: the bits of each 32-bit draw uniform_ keeps
_A = math.sqrt(5)  # nn.Linear / nn.Conv1d.reset_parameters: kaiming_uniform_(a=math.sqrt(5))


class Layer(NamedTuple):
    """A ``Linear`` or ``Conv1d`` of the network: its parameters' name prefix and its weight's shape."""

    prefix: str
    weight: tuple[int, ...]


def _dense(prefix: str, sizes: list[int]) -> list[Layer]:
    """``models.nets._dense``: a ``Linear`` at every even index of the ``Sequential`` (a ReLU between)."""
    return [Layer(f"{prefix}.{2 * i}", (b, a)) for i, (a, b) in enumerate(itertools.pairwise(sizes))]


def layers(spec: ModelSpec) -> list[Layer] | None:
    """The weighted layers of ``build_model(spec)`` in module order, or None for a kind not covered."""
    d_in = spec.window * spec.n_features
    if spec.kind == "mlp":
        return [*_dense("body", [d_in, *spec.hidden]), Layer("head", (spec.n_outputs, spec.hidden[-1]))]
    if spec.kind == "autoencoder":
        return [*_dense("body", [d_in, *spec.hidden]), *_dense("head", [*reversed(spec.hidden), d_in])]
    if spec.kind == "cnn1d":
        channels = [spec.n_features, *spec.hidden]
        convs = [Layer(f"body.{2 * i}", (b, a, 3)) for i, (a, b) in enumerate(itertools.pairwise(channels))]
        return [*convs, Layer("head", (spec.n_outputs, spec.hidden[-1]))]
    return None


def _uniform(draws: np.ndarray, bound: float) -> np.ndarray:
    """torch's ``uniform_(-bound, bound)`` on float32 from its 32-bit draws (module docstring)."""
    hi = np.float32(bound)
    lo = np.float32(-bound)
    k = (draws & np.uint32((1 << _DIGITS) - 1)).astype(np.float64)
    return (k * 2.0**-_DIGITS * (np.float64(hi) - np.float64(lo)) + np.float64(lo)).astype(np.float32)


def seed_params(spec: ModelSpec, seed: int) -> dict[str, np.ndarray] | None:
    """Every parameter of ``build_model(spec, seed)`` (personal ones included), float32, in the model's order;
    None when this module does not cover the kind or the seed (build with torch then)."""
    spec.validate()
    found = layers(spec)
    if found is None or not 0 <= seed < 2**32:
        return None
    rng = np.random.RandomState(seed)
    gain = math.sqrt(2.0 / (1 + _A**2))  # torch.nn.init.calculate_gain("leaky_relu", a)
    out: dict[str, np.ndarray] = {}
    for layer in found:
        fan_in = math.prod(layer.weight[1:])
        n = math.prod(layer.weight)
        bound = math.sqrt(3.0) * (gain / math.sqrt(fan_in))  # kaiming_uniform_: sqrt(3.0) * std
        draws = rng.randint(0, 2**32, size=n, dtype=np.uint32)
        out[f"{layer.prefix}.weight"] = _uniform(draws, bound).reshape(layer.weight)
        bias_bound = 1.0 / math.sqrt(fan_in)
        out[f"{layer.prefix}.bias"] = _uniform(rng.randint(0, 2**32, size=layer.weight[0], dtype=np.uint32), bias_bound)
    return out
