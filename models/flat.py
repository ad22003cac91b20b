"""Flat-parameter views: model ↔ named float32 arrays ↔ wire, and the personal split.

Why arrays keyed by parameter name in a stable order: a delta on the wire is
``{name: w_local - w_base}`` for the *shared* parameters only; the aggregator
checks names and shapes against the same spec, and the site keeps its
personal parameters (a local head) out of every payload. Buffers (the
standardisation constants) come from the spec and are never sent.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from models.names import ModelStateError as ModelStateError  # defined without torch; raised here too
from models.names import split
from models.nets import unwrap
from models.spec import ModelSpec


def split_names(spec: ModelSpec, model: nn.Module) -> tuple[list[str], list[str]]:
    """``(shared, personal)`` parameter names in the model's own order.

    A ``personal`` prefix that matches no parameter is an error (a typo would
    otherwise silently send the head that was meant to stay home).
    """
    return split(spec, [n for n, _ in unwrap(model).named_parameters()])


def _arrays(model: nn.Module, names: list[str]) -> dict[str, np.ndarray]:
    params = dict(unwrap(model).named_parameters())
    return {n: params[n].detach().cpu().numpy().astype(np.float32, copy=True) for n in names}


def shared_state(model: nn.Module, spec: ModelSpec) -> dict[str, np.ndarray]:
    """Copies of the shared (federated) parameters as float32 arrays, in stable order."""
    return _arrays(model, split_names(spec, model)[0])


def personal_state(model: nn.Module, spec: ModelSpec) -> dict[str, np.ndarray]:
    """Copies of the personal parameters (kept at the site), in stable order."""
    return _arrays(model, split_names(spec, model)[1])


def _load(model: nn.Module, names: list[str], arrays: Mapping[str, np.ndarray], what: str) -> None:
    missing = [n for n in names if n not in arrays]
    unexpected = [n for n in arrays if n not in names]
    if missing or unexpected:
        raise ModelStateError(f"{what} state does not match the model: missing {missing}, unexpected {unexpected}")
    params = dict(unwrap(model).named_parameters())
    for n in names:
        a = np.asarray(arrays[n])
        if tuple(a.shape) != tuple(params[n].shape):
            raise ModelStateError(
                f"{what} parameter {n!r} has shape {tuple(a.shape)}, model expects {tuple(params[n].shape)}"
            )
    with torch.no_grad():
        for n in names:
            params[n].copy_(torch.as_tensor(np.array(arrays[n], dtype=np.float32)))  # copy: wire arrays are read-only


def load_shared_state(model: nn.Module, spec: ModelSpec, arrays: Mapping[str, np.ndarray]) -> None:
    """Load shared parameters in place; names and shapes must match exactly."""
    _load(model, split_names(spec, model)[0], arrays, "shared")


def load_personal_state(model: nn.Module, spec: ModelSpec, arrays: Mapping[str, np.ndarray]) -> None:
    """Load personal parameters in place; names and shapes must match exactly."""
    _load(model, split_names(spec, model)[1], arrays, "personal")


def state_delta(new: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``new - base`` per name (same names required), float32."""
    if list(new) != list(base):
        raise ModelStateError(f"cannot subtract states with different names: {list(new)} vs {list(base)}")
    return {n: (np.asarray(new[n], np.float32) - np.asarray(base[n], np.float32)) for n in new}
