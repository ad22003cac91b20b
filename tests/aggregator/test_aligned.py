"""An opened update's float32 tensors land on aligned memory, unchanged, whatever its headers' lengths."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aggregator.aligned import ALIGN, aligned
from aggregator.core import AggregatorCore
from broker_bridge import envelope
from broker_bridge.envelope import UpdateHeader
from broker_bridge.sealopen import PEEK_BYTES, seal_open
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


def _data_offset(fed, sealed: bytes) -> int:
    """Where the first tensor starts in the update's plaintext (opened without placement)."""
    offset = envelope._tensor_data_at(seal_open(memoryview(sealed)[4:], fed.agg.box_key))
    assert offset is not None
    return offset


def test_opened_updates_are_aligned_without_a_copy_and_their_checks_hold_for_every_header_length(tmp_path):
    """msg ids of 1 to 4 characters shift the tensors by every offset mod 4 in the plaintext: each opens with
    its first tensor on a 64-byte boundary and every tensor aligned, as views into the plaintext (nothing for
    ``aligned`` to copy), with the same values, the norm worked out in float64 here, and a NaN still refused."""
    fed = make_federation(tmp_path, ["site-a"])
    core = AggregatorCore(
        fed.config(strategy='kind = "fedbuff"\nbuffer_size = 5', extra="[validation]\nmax_norm = 50.0")
    )
    try:
        rng = np.random.default_rng(0)
        offsets = set()
        for msg_id in ("a", "ab", "abc", "abcd"):
            delta = random_delta(core.model, rng, scale=0.1)
            sealed = fed.seal("site-a", delta, 0, msg_id=msg_id)[0]
            offsets.add(_data_offset(fed, sealed) % 4)
            _, views = envelope.open_update(sealed, fed.agg, core.enrollment)
            assert aligned(views) is views  # placed by seal_open: no copy
            assert next(iter(views.values())).ctypes.data % ALIGN == 0
            op = core.open(sealed)
            assert op.reason is None, op.detail
            for name, a in op.tensors.items():
                assert a.flags.aligned and not a.flags.writeable
                np.testing.assert_array_equal(a, delta[name])
            by_hand = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values()))
            assert op.norm == pytest.approx(by_hand, rel=1e-5)
            bad = {k: v.copy() for k, v in delta.items()}
            next(iter(bad.values())).flat[3] = np.nan
            refused = core.open(fed.seal("site-a", bad, 0, msg_id=msg_id)[0])
            assert refused.reason == "nonfinite"
        assert offsets - {0}  # misaligned starts were among them
    finally:
        core.close()


def test_an_update_whose_headers_are_too_long_to_place_is_copied_to_aligned_memory(tmp_path):
    """A header longer than seal_open reads before opening (a long privacy note) leaves the tensors where they
    fall; the opener still hands on aligned tensors with the same values and the same norm."""
    fed = make_federation(tmp_path, ["site-a"])
    core = AggregatorCore(
        fed.config(strategy='kind = "fedbuff"\nbuffer_size = 5', extra="[validation]\nmax_norm = 50.0")
    )
    try:
        delta = random_delta(core.model, np.random.default_rng(1), scale=0.1)
        by_hand = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values()))
        misplaced = 0
        for extra in range(8):  # most of these lengths leave the tensors off a multiple of 4
            note = "x" * (PEEK_BYTES + extra)
            header = UpdateHeader("site-a", 1 + extra, f"m{extra}", 0, 10, {"epsilon": 1.0, "note": note})
            sealed = envelope.seal_update(header, delta, fed.sites["site-a"], fed.agg.public().box_pub)
            offset = _data_offset(fed, sealed)
            assert offset > PEEK_BYTES
            _, views = envelope.open_update(sealed, fed.agg, core.enrollment)
            if offset % 4:
                assert not next(iter(views.values())).flags.aligned  # not placed: where the plaintext put it
                misplaced += 1
            op = core.open(sealed)
            assert op.reason is None, op.detail
            for name, a in op.tensors.items():
                assert a.flags.aligned
                np.testing.assert_array_equal(a, delta[name])
            assert op.norm == pytest.approx(by_hand, rel=1e-5)
        assert misplaced > 0
    finally:
        core.close()


def test_the_core_opens_float32_updates_aligned_whatever_their_headers_length_without_a_copy(tmp_path, monkeypatch):
    """The opener asks ``seal_open`` to put the model's float32 tensor bytes, which end the plaintext, on an
    aligned address: even a header too long to peek at (over PEEK_BYTES) leaves nothing for ``aligned`` to copy,
    and the values and the norm are the update's."""
    import aggregator.opener

    fed = make_federation(tmp_path, ["site-a"])
    core = AggregatorCore(
        fed.config(strategy='kind = "fedbuff"\nbuffer_size = 5', extra="[validation]\nmax_norm = 50.0")
    )
    copied = []
    real = aggregator.opener.aligned

    def spy(tensors):
        out = real(tensors)
        copied.append(out is not tensors)
        return out

    monkeypatch.setattr(aggregator.opener, "aligned", spy)
    try:
        delta = random_delta(core.model, np.random.default_rng(2), scale=0.1)
        by_hand = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values()))
        offsets = set()
        for extra in range(4):
            note = "x" * (PEEK_BYTES + extra)
            header = UpdateHeader("site-a", 1 + extra, f"m{extra}", 0, 10, {"epsilon": 1.0, "note": note})
            sealed = envelope.seal_update(header, delta, fed.sites["site-a"], fed.agg.public().box_pub)
            offsets.add(_data_offset(fed, sealed) % 4)
            op = core.open(sealed)
            assert op.reason is None, op.detail
            for name, a in op.tensors.items():
                assert a.flags.aligned and not a.flags.writeable
                np.testing.assert_array_equal(a, delta[name])
            assert op.norm == pytest.approx(by_hand, rel=1e-5)
        assert offsets - {0}  # starts the peek could not place were among them
        assert copied == [False] * 4
    finally:
        core.close()
