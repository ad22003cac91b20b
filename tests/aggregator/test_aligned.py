"""An opened update's float32 tensors land on aligned memory, unchanged, whatever its headers' lengths."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aggregator.aligned import ALIGN, aligned
from aggregator.core import AggregatorCore
from broker_bridge import envelope
from tests.aggregator.helpers import make_federation, random_delta


def _misaligned(values: dict[str, np.ndarray], shift: int) -> dict[str, np.ndarray]:
    """Views of ``values`` packed back to back ``shift`` bytes past an aligned start, as a plaintext holds them."""
    total = sum(a.nbytes for a in values.values())
    raw = np.zeros(total + shift + ALIGN, np.uint8)
    at = -raw.ctypes.data % ALIGN + shift
    out = {}
    for name, a in values.items():
        raw[at : at + a.nbytes] = np.frombuffer(a.tobytes(), np.uint8)
        out[name] = np.frombuffer(raw.data, a.dtype, a.size, at).reshape(a.shape)
        at += a.nbytes
    return out


@pytest.mark.parametrize("shift", [1, 2, 3, 5])
def test_misaligned_tensors_are_copied_to_aligned_read_only_memory_bit_for_bit(shift):
    rng = np.random.default_rng(shift)
    values = {
        "w": rng.standard_normal((3, 5)).astype(np.float32),
        "scalar": np.array(1.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "b": rng.standard_normal(7).astype(np.float32),
    }
    views = _misaligned(values, shift)
    assert not views["w"].flags.aligned  # the case the module is for: NumPy's slow path
    out = aligned(views)
    assert list(out) == list(values)
    for name, a in out.items():
        assert (a.size == 0 or a.ctypes.data % ALIGN == 0) and a.flags.aligned and not a.flags.writeable
        assert a.shape == values[name].shape and a.dtype == np.float32
        assert a.tobytes() == values[name].tobytes()


def test_tensors_already_aligned_are_returned_as_they_are():
    views = _misaligned({"w": np.ones(16, np.float32), "b": np.ones(16, np.float32)}, 0)  # 64 bytes each
    assert aligned(views) is views


def test_opened_updates_are_aligned_and_their_norm_and_nan_checks_hold_for_every_header_length(tmp_path):
    """msg ids of 1 to 4 characters shift the tensors by every offset mod 4: each opens to aligned memory with
    the same values, the norm worked out in float64 here, and a NaN is still refused as nonfinite."""
    fed = make_federation(tmp_path, ["site-a"])
    core = AggregatorCore(
        fed.config(strategy='kind = "fedbuff"\nbuffer_size = 5', extra="[validation]\nmax_norm = 50.0")
    )
    try:
        rng = np.random.default_rng(0)
        offsets = set()
        for msg_id in ("a", "ab", "abc", "abcd"):
            delta = random_delta(core.model, rng, scale=0.1)
            op = core.open(fed.seal("site-a", delta, 0, msg_id=msg_id)[0])
            assert op.reason is None, op.detail
            _, views = envelope.open_update(op.sealed, fed.agg, core.enrollment)  # where the plaintext put them
            offsets.add(next(iter(views.values())).ctypes.data % 4)
            for name, a in op.tensors.items():
                assert a.ctypes.data % ALIGN == 0
                np.testing.assert_array_equal(a, delta[name])
            by_hand = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values()))
            assert op.norm == pytest.approx(by_hand, rel=1e-5)
            bad = {k: v.copy() for k, v in delta.items()}
            next(iter(bad.values())).flat[3] = np.nan
            refused = core.open(fed.seal("site-a", bad, 0, msg_id=msg_id)[0])
            assert refused.reason == "nonfinite"
        assert len(offsets) > 1  # misaligned starts were among them
    finally:
        core.close()
