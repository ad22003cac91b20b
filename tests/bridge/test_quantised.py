"""The int8 update encoding: unbiased stochastic rounding, one step of error at most, strict decoding.

The expectations are worked out by hand from the definition (a value v = x / s
between two integers rounds up with probability frac(v)), not from the code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from broker_bridge import envelope, quantised
from broker_bridge.envelope import UpdateHeader
from broker_bridge.errors import WireError
from broker_bridge.keys import Enrollment, KeyPair
from broker_bridge.rounding import private_rng

# one block of 1,024 values: this pattern tiled 128 times. Its largest magnitude 127/128 makes the step
# exactly 2^-7, and every value is a dyadic fraction, so v = x / s is exact
STEP = 2.0**-7
PATTERN = (np.array([127, 1.25, -1.25, 0.0, 63.5, -33.25, 0.375, -127]) * STEP).astype(np.float32)
# by hand, from v: (lower integer, upper integer, probability of the upper one = frac(v))
OUTCOMES = [
    (127, 127, 0.0),
    (1, 2, 0.25),  # 1.25
    (-2, -1, 0.75),  # -1.25: floor -2, frac 0.75
    (0, 0, 0.0),
    (63, 64, 0.5),  # 63.5
    (-34, -33, 0.75),  # -33.25: floor -34, frac 0.75
    (0, 1, 0.375),  # 0.375
    (-127, -127, 0.0),
]


def test_rounding_is_unbiased_with_the_hand_computed_probabilities() -> None:
    x = np.tile(PATTERN, 128)
    draws = 300
    rng = private_rng()
    qs = np.stack([quantised.quantise(x, rng)[0].astype(np.int64) for _ in range(draws)])  # (draws, 1024)
    step = float(quantised.quantise(x, rng)[1][0])
    assert step == STEP
    for j, (lo, hi, p_up) in enumerate(OUTCOMES):
        got = qs[:, j::8].ravel()  # every copy of pattern element j in every draw
        n = got.size
        assert set(np.unique(got)) <= {lo, hi}, (j, np.unique(got))
        freq_up = float(np.mean(got == hi)) if hi != lo else 0.0
        sd = np.sqrt(p_up * (1 - p_up) / n)
        assert abs(freq_up - p_up) <= 5 * sd + 1e-12, (j, freq_up, p_up)
        expected = lo + p_up * (hi - lo)  # E[q], by hand
        assert abs(float(np.mean(got)) - expected) <= 5 * sd + 1e-12
        # and E[q s] = x: the dequantised mean is the input within the sampling error
        assert abs(float(np.mean(got)) * step - float(PATTERN[j])) <= 5 * sd * step + 1e-12


def test_every_value_is_within_one_step_of_its_block() -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(5000) * np.repeat([0.001, 0.1, 1.0, 10.0, 0.0001], 1000)).astype(np.float32)
    x[2048:3072] = 0.0  # an all-zero block: step 0, decodes to exact zeros
    q, steps = quantised.quantise(x, private_rng())
    assert q.dtype == np.int8 and q.shape == x.shape and steps.shape == (5,)  # 4 full blocks and a tail of 904
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    y = quantised.dequantise(q, steps)
    for b in range(5):
        block = x[b * 1024 : (b + 1) * 1024].astype(np.float64)
        m = float(np.abs(block).max())
        s = float(steps[b])
        assert s >= m / 127 and s <= m / 127 * (1 + 1e-6)  # the step is max/127, rounded up to float32
        err = np.abs(y[b * 1024 : (b + 1) * 1024].astype(np.float64) - block)
        assert float(err.max()) <= s * (1 + 1e-6) + 1e-30  # under one step (plus float32 rounding of q * s)
    assert not y[2048:3072].any()


def test_rounding_uses_no_global_generator() -> None:
    """Seeding numpy's or torch's global generator neither replays the rounding nor is consumed by it."""
    x = np.tile(PATTERN, 128)
    encodings = []
    for _ in range(2):
        np.random.seed(0)
        torch.manual_seed(0)
        encodings.append(quantised.encode({"w": x}, "int8")["w"])
        assert np.random.random() == np.random.RandomState(0).random_sample()  # numpy's global stream untouched
        assert torch.rand(1).item() == torch.rand(1, generator=torch.Generator().manual_seed(0)).item()
    # 5 of 8 values round at random in each of 128 copies: equal twice only with probability < 2^-400
    assert not np.array_equal(encodings[0], encodings[1])


def _wire(**tensors: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays as the aggregator sees them: through the tensor block's encoder and decoder."""
    return envelope.decode_tensors(envelope.encode_tensors(tensors))


GOOD_Q = np.zeros(2000, np.int8)
GOOD_S = np.full(2, 0.01, np.float32)


@pytest.mark.parametrize(
    ("tensors", "encoding", "words"),
    [
        ({"w": GOOD_Q, "w#scale": np.array([0.01, np.nan], np.float32)}, "int8", "NaN or infinity"),
        ({"w": GOOD_Q, "w#scale": np.array([np.inf, 0.01], np.float32)}, "int8", "NaN or infinity"),
        ({"w": GOOD_Q, "w#scale": np.array([-0.01, 0.01], np.float32)}, "int8", "outside [0"),
        ({"w": GOOD_Q, "w#scale": np.array([1e37, 0.01], np.float32)}, "int8", "outside [0"),
        ({"w": GOOD_Q, "w#scale": np.full(3, 0.01, np.float32)}, "int8", "need float32 of shape (2,)"),
        ({"w": GOOD_Q[:1024], "w#scale": GOOD_S}, "int8", "need float32 of shape (1,)"),
        ({"w": GOOD_Q, "w#scale": GOOD_S.astype(np.float64)}, "int8", "float64"),
        ({"w": GOOD_Q.astype(np.float32), "w#scale": GOOD_S}, "int8", "'w' is float32"),
        ({"w": GOOD_Q}, "int8", "no scale tensor"),
        ({"w": GOOD_Q, "w#scale": GOOD_S, "v#scale": GOOD_S}, "int8", "'v#scale' has no value tensor"),
        ({"w": GOOD_Q, "w#scale": GOOD_S}, "int4", "unknown update encoding 'int4'"),
    ],
)
def test_malformed_int8_blocks_are_refused_naming_the_fault(tensors, encoding, words) -> None:
    with pytest.raises(WireError) as err:
        quantised.decode(_wire(**tensors), encoding)
    assert err.value.reason == "encoding"
    assert words in err.value.detail


def test_the_header_says_the_encoding_and_a_float32_header_is_unchanged() -> None:
    agg, site = KeyPair.generate("aggregator", "agg"), KeyPair.generate("site", "s1")
    enr = Enrollment("f", agg.public())
    enr.add(site.public())
    delta = {"a": np.linspace(-1, 1, 3000, dtype=np.float32).reshape(30, 100), "b": np.float32([0.5, -0.25])}
    plain = UpdateHeader("s1", 1, "m1", 0, 10)
    assert "encoding" not in plain.to_dict()  # float32 updates read the same to an aggregator without this field
    blob32 = envelope.seal_update(plain, delta, site, agg.public().box_pub)
    header8 = UpdateHeader("s1", 2, "m2", 0, 10, encoding="int8")
    blob8 = envelope.seal_update(header8, quantised.encode(delta, "int8"), site, agg.public().box_pub)
    h, t = envelope.open_update(blob8, agg, enr)
    assert h.encoding == "int8" and list(t) == ["a", "a#scale", "b", "b#scale"]
    back = quantised.decode(t, h.encoding)
    assert list(back) == ["a", "b"] and all(back[k].dtype == np.float32 for k in back)
    assert np.abs(back["a"] - delta["a"]).max() <= 1.0 / 127 * (1 + 1e-6)
    assert envelope.open_update(blob32, agg, enr)[0].encoding == "float32"
    # 3,002 parameters: 1 byte each + 3 steps; the fixed framing is ~300 bytes of both
    assert len(blob8) < 0.3 * len(blob32)


def test_a_100k_update_is_under_a_third_of_its_float32_bytes() -> None:
    agg, site = KeyPair.generate("aggregator", "agg"), KeyPair.generate("site", "s1")
    rng = np.random.default_rng(0)
    delta = {f"t{i}": rng.standard_normal(25_000).astype(np.float32) for i in range(4)}
    head = UpdateHeader("s1", 1, "m1", 0, 10)
    b32 = envelope.seal_update(head, delta, site, agg.public().box_pub)
    b8 = envelope.seal_update(
        UpdateHeader("s1", 1, "m1", 0, 10, encoding="int8"),
        quantised.encode(delta, "int8"),
        site,
        agg.public().box_pub,
    )
    assert len(b8) / len(b32) < 0.26  # 1/4 + 4 bytes per 1,024 values + framing
