"""Model definitions, flat-parameter views, personalisation split, ONNX export.

Public API (``from models import ...``):

- :class:`ModelSpec` — frozen dataclass, parseable by ``fedline.config.parse``;
  ``spec.to_dict()`` / ``ModelSpec.from_dict(d)`` for the manifest JSON;
  ``spec.input_shape`` is one sample's shape without the batch axis.
  Importing ``ModelSpec`` does not import torch.
- ``build_model(spec, seed=0) -> torch.nn.Module`` — deterministic init, so every
  party builds the same version 0. Every model has ``body.*`` and ``head.*``
  parameters (the autoencoder's head is its decoder).
- ``shared_state(model, spec)`` / ``personal_state(model, spec)`` — float32 numpy
  copies keyed by parameter name, model order; ``load_shared_state`` /
  ``load_personal_state`` load them in place (strict names and shapes, else
  ``ModelStateError``); ``split_names(spec, model) -> (shared, personal)``;
  ``state_delta(new, base)``.
- ``loss_per_sample(model, spec, x, y)`` — the training objective, per sample.
- ``export_onnx(model, spec) -> bytes`` — input ``"x"`` ``(batch, *input_shape)``,
  output ``"y"`` ``(batch, n_outputs)``: probability (sigmoid) for
  classification, the value for regression, the mean squared reconstruction
  error (in standardised units) for anomaly; dynamic batch axis, opset 17.
- Without torch (``models.seed_init``, ``models.onnx_graph``, ``models.version0``): version 0's parameters
  drawn as torch draws them (``seed_params``), and the ONNX of an MLP or autoencoder written from its
  weights (``build_onnx``), for processes that need no training (the aggregator).

Why lazy: the line inference and config code read ``ModelSpec`` without
paying for torch; the torch-backed names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from models.spec import ModelSpec

_LAZY = {
    "build_model": "models.nets",
    "loss_per_sample": "models.nets",
    "Scorer": "models.nets",
    "unwrap": "models.nets",
    "shared_state": "models.flat",
    "personal_state": "models.flat",
    "load_shared_state": "models.flat",
    "load_personal_state": "models.flat",
    "split_names": "models.flat",
    "state_delta": "models.flat",
    "ModelStateError": "models.flat",
    "export_onnx": "models.export",
}

__all__ = ["ModelSpec", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
