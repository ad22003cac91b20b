"""models.seed_init: version 0 without torch, bit for bit what models.nets.build_model makes with torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models import ModelSpec, ModelStateError, build_model, shared_state, split_names
from models.names import split
from models.seed_init import seed_params
from models.version0 import seed_shared_state

ROOT = Path(__file__).resolve().parents[2]

SPECS = {
    "mlp-demo": ModelSpec(
        kind="mlp",
        n_features=5,
        hidden=[32, 32],
        input_mean=[300, 310, 1500, 40, 100],
        input_scale=[2, 1.5, 180, 10, 60],
    ),
    "mlp-personal-window": ModelSpec(
        kind="mlp", n_features=3, hidden=[7], task="regression", window=4, n_outputs=2, personal=["head."]
    ),
    "mlp-wide": ModelSpec(kind="mlp", n_features=4, hidden=[256, 256]),  # 66k draws: no batching quirk
    "autoencoder": ModelSpec(kind="autoencoder", n_features=6, hidden=[8, 3], task="anomaly", personal=["head."]),
    "cnn1d": ModelSpec(kind="cnn1d", n_features=3, hidden=[8, 5], window=16, personal=["head."]),
}
SEEDS = [0, 1, 7, 123_456_789, 2**31, 2**32 - 1]


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).tobytes()


@pytest.mark.parametrize("name", SPECS)
def test_every_parameter_is_torchs_bit_for_bit(name: str) -> None:
    spec = SPECS[name]
    for seed in SEEDS:
        want = {n: p.detach().numpy() for n, p in build_model(spec, seed=seed).named_parameters()}
        got = seed_params(spec, seed)
        assert got is not None
        assert list(got) == list(want)  # names, in the model's order
        for n in want:
            assert got[n].dtype == np.float32 and got[n].shape == tuple(want[n].shape), n
            assert _bits(got[n]) == _bits(want[n]), f"{name} seed {seed}: {n} differs"


@pytest.mark.parametrize("name", SPECS)
def test_shared_state_is_torchs_and_keeps_the_head_out(name: str) -> None:
    spec = SPECS[name]
    want = shared_state(build_model(spec, seed=11), spec)
    got = seed_shared_state(spec, 11)
    assert list(got) == list(want)
    assert all(_bits(got[n]) == _bits(want[n]) for n in want)
    if spec.personal:
        assert not any(n.startswith("head.") for n in got)


def test_the_draws_depend_on_the_seed_and_the_bound_on_fan_in() -> None:
    spec = SPECS["mlp-demo"]
    a, b = seed_params(spec, 0), seed_params(spec, 1)
    assert a is not None and b is not None
    assert not np.array_equal(a["body.0.weight"], b["body.0.weight"])
    # Kaiming-uniform with a = sqrt(5): U(±1/sqrt(fan_in)); 1,024 draws come close to the bound
    w = a["body.2.weight"]
    assert np.abs(w).max() <= 1 / np.sqrt(32) and np.abs(w).max() > 0.95 / np.sqrt(32)


def test_a_gru_or_a_seed_outside_32_bits_is_left_to_torch() -> None:
    gru = ModelSpec(kind="gru", n_features=4, hidden=[8, 6], window=10, task="regression")
    assert seed_params(gru, 0) is None
    assert seed_params(SPECS["mlp-demo"], 2**32) is None
    assert seed_params(SPECS["mlp-demo"], -1) is None
    # the fallback builds with torch: still version 0 exactly
    for spec, seed in ((gru, 3), (SPECS["mlp-demo"], 2**32 + 5)):
        want = shared_state(build_model(spec, seed=seed), spec)
        got = seed_shared_state(spec, seed)
        assert list(got) == list(want) and all(_bits(got[n]) == _bits(want[n]) for n in want)


def test_the_split_is_the_models_split() -> None:
    spec = SPECS["autoencoder"]
    model = build_model(spec)
    names = [n for n, _ in model.named_parameters()]
    assert split(spec, names) == split_names(spec, model)
    with pytest.raises(ModelStateError, match="matches no parameter"):
        split(ModelSpec(kind="mlp", n_features=2, personal=["tail."]), ["body.0.weight", "head.weight"])
    with pytest.raises(ModelStateError, match="every parameter is personal"):
        split(ModelSpec(kind="mlp", n_features=2, personal=["body.", "head."]), ["body.0.weight", "head.weight"])


def test_version_0_without_torch_imports_no_torch() -> None:
    """A fresh process makes version 0 and reads nothing of torch (the aggregator's start, issue 19)."""
    code = f"""
import json, sys
from models import ModelSpec
from models.version0 import seed_shared_state
spec = ModelSpec.from_dict({json.dumps(SPECS["mlp-demo"].to_dict())})
state = seed_shared_state(spec, 7)
print(json.dumps({{"torch": "torch" in sys.modules, "params": int(sum(v.size for v in state.values()))}}))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"torch": False, "params": 5 * 32 + 32 + 32 * 32 + 32 + 32 + 1}
    assert torch.is_tensor(torch.zeros(1))  # this process has torch; the child did not need it
