"""``check_update`` alone: the norm it decides with is the one a restart recomputes, and hostile values are refused
with their reason and no floating-point warning (NumPy's flags are not what the check relies on)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from aggregator import robust
from aggregator.config import ValidationConfig
from aggregator.validate import ValidationError, check_update
from broker_bridge import envelope
from broker_bridge.envelope import UpdateHeader

REFERENCE = {"a.weight": (37, 129), "a.bias": (37,), "b.weight": (3, 5, 7), "b.scale": ()}
HEADER = UpdateHeader("site-a", 1, "m1", 0, 10)
CFG = ValidationConfig(max_norm=1e6)


def delta(rng: np.random.Generator, scale: float = 0.1) -> dict[str, np.ndarray]:
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in REFERENCE.items()}


def wire(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors as the opener sees them: read-only views of one decoded block."""
    return envelope.decode_tensors(envelope.encode_tensors(tensors))


def refusal(tensors: dict[str, np.ndarray]) -> tuple[str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning from NumPy would raise here instead of a refusal
        with pytest.raises(ValidationError) as err:
            check_update(HEADER, tensors, REFERENCE, CFG)
    return err.value.reason, err.value.detail


def test_the_norm_is_robust_l2_norm_bit_for_bit_and_agrees_with_float64():
    """The norm decided at intake must be the one the reduce recomputes for an update read back after a restart
    (``robust.l2_norm``), to the bit: a clip scale from either gives the same model."""
    rng = np.random.default_rng(3)
    for scale in (1e-4, 0.1, 30.0):
        d = wire(delta(rng, scale))
        norm = check_update(HEADER, d, REFERENCE, CFG)
        assert norm == robust.l2_norm(d)
        exact = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in d.values()))
        assert norm == pytest.approx(exact, rel=1e-5)


def test_nan_inf_and_signalling_nan_are_nonfinite_and_name_their_tensor():
    rng = np.random.default_rng(4)
    signalling = np.frombuffer(np.uint32(0x7FA00001).tobytes(), np.float32)[0]  # raises FE_INVALID in arithmetic
    for bad in (np.nan, np.inf, -np.inf, signalling):
        d = delta(rng)
        d["b.weight"] = d["b.weight"].copy()
        d["b.weight"][2, 4, 6] = bad
        assert refusal(wire(d)) == ("nonfinite", "'b.weight' holds NaN or infinity")


def test_finite_values_whose_squares_overflow_exceed_any_bound_without_a_warning():
    rng = np.random.default_rng(5)
    d = delta(rng)
    d["a.bias"] = np.full(37, np.finfo(np.float32).max, np.float32)
    reason, detail = refusal(wire(d))
    assert reason == "norm" and "L2 norm inf exceeds" in detail


def test_shape_and_dtype_are_checked_tensor_by_tensor_in_the_model_order():
    rng = np.random.default_rng(6)
    d = delta(rng)
    d["a.bias"] = d["a.bias"][:36]
    assert refusal(wire(d)) == ("shape", "'a.bias' has shape (36,), model expects (37,)")
    d = delta(rng)
    d["b.scale"] = d["b.scale"].astype(np.float64)
    assert refusal(wire(d)) == ("dtype", "'b.scale' is float64, expected float32")
    d = delta(rng)
    d["b.weight"] = d["b.weight"].reshape(5, 3, 7)  # the same values, another shape
    assert refusal(wire(d)) == ("shape", "'b.weight' has shape (5, 3, 7), model expects (3, 5, 7)")
