"""Secure aggregation refuses the settings it cannot honour, with an error naming them."""

from __future__ import annotations

import pytest

from aggregator.config import parse_config
from fedline.config import ConfigError


def _config(strategy: dict, secagg: dict | None = None):
    table = {
        "aggregator": {"federation": "f", "key_file": "k", "enrollment_file": "e", "state_dir": "s"},
        "model": {"kind": "mlp", "n_features": 3, "hidden": [8]},
        "strategy": strategy,
    }
    if secagg is not None:
        table["secagg"] = secagg
    return parse_config(table)


def test_secure_aggregation_refuses_what_masking_makes_impossible() -> None:
    ok = _config({"kind": "fedbuff", "secure_aggregation": True, "norm_bound": 2.0})
    assert ok.strategy.secure_aggregation and ok.strategy.min_sites == 3
    with pytest.raises(ConfigError, match=r"robust = 'median' cannot run with secure_aggregation"):
        _config({"kind": "fedbuff", "secure_aggregation": True, "norm_bound": 2.0, "robust": "median"})
    with pytest.raises(ConfigError, match=r"robust = 'trimmed_mean' cannot run with secure_aggregation"):
        _config({"kind": "fedbuff", "secure_aggregation": True, "norm_bound": 2.0, "robust": "trimmed_mean"})
    with pytest.raises(ConfigError, match=r"'fedasync' cannot be secure: FedAsync applies one update per version"):
        _config({"kind": "fedasync", "secure_aggregation": True, "norm_bound": 2.0, "min_sites": 1})
    with pytest.raises(ConfigError, match=r"needs a per-site norm bound"):
        _config({"kind": "fedbuff", "secure_aggregation": True, "norm_bound": 0.0})
    with pytest.raises(ConfigError, match=r"sample_weighting = true cannot run with secure_aggregation"):
        _config({"kind": "fedbuff", "secure_aggregation": True, "sample_weighting": True, "sample_cap": 100.0})
    with pytest.raises(ConfigError, match=r"needs min_sites >= 3"):
        _config({"kind": "fedbuff", "secure_aggregation": True, "norm_bound": 2.0, "min_sites": 2})
