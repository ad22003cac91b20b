"""Version 0's shared parameters: without torch where ``models.seed_init`` covers the model, else with torch."""

from __future__ import annotations

import numpy as np

from models.names import split
from models.seed_init import seed_params
from models.spec import ModelSpec


def seed_shared_state(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """Version 0's shared parameters, ``shared_state(build_model(spec, seed), spec)``: without torch where
    :func:`models.seed_init.seed_params` covers the model (bit for bit the same), else built with torch."""
    params = seed_params(spec, seed)
    if params is None:
        from models.flat import shared_state
        from models.nets import build_model

        return shared_state(build_model(spec, seed=seed), spec)
    shared, _ = split(spec, list(params))
    return {n: params[n] for n in shared}
