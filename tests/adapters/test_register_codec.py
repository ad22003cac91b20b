"""Register codec properties: encode then decode is the identity, for every type and order."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_adapters.registers import RegisterMap, TagSpec, decode, encode

RANGES = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}
orders = st.sampled_from(["big", "little"])


def value_for(dtype: str):
    if dtype in RANGES:
        return st.integers(*RANGES[dtype])
    if dtype == "float32":
        return st.floats(width=32, allow_nan=False, allow_infinity=False)
    return st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([*list(RANGES), "float32", "float64"]))
    tag = TagSpec(name="t", table="holding", address=0, type=dtype, word_order=draw(orders), byte_order=draw(orders))
    return tag, draw(value_for(dtype))


@settings(max_examples=300, deadline=None)
@given(cases())
def test_encode_decode_round_trip(case) -> None:
    tag, value = case
    regmap = RegisterMap(tags=[tag])
    words = encode(regmap, tag, value)
    assert len(words) == tag.words and all(0 <= w <= 0xFFFF for w in words)
    assert decode(regmap, tag, words) == value


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**16 - 1), st.floats(0.01, 100.0), st.floats(-1000.0, 1000.0))
def test_scale_and_offset(raw: int, scale: float, offset: float) -> None:
    tag = TagSpec(name="t", table="input", address=0, type="uint16", scale=scale, offset=offset)
    regmap = RegisterMap(tags=[tag])
    eng = decode(regmap, tag, [raw])
    assert eng == raw * scale + offset
    assert encode(regmap, tag, eng) == [raw]


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12), orders)
def test_strings_round_trip_or_are_cut_at_a_character(text: str, byte_order: str) -> None:
    tag = TagSpec(name="s", table="holding", address=0, type="string", length=6, byte_order=byte_order)
    regmap = RegisterMap(tags=[tag])
    words = encode(regmap, tag, text)
    assert len(words) == 6 and all(0 <= w <= 0xFFFF for w in words)
    data = text.encode("utf-8")
    expected = text if len(data) <= 12 else data[:12].decode("utf-8", "ignore")
    assert decode(regmap, tag, words) == expected


def test_big_endian_float32_matches_struct() -> None:
    tag = TagSpec(name="t", table="holding", address=0, type="float32")
    hi, lo = struct.unpack(">HH", struct.pack(">f", -2.5))
    assert encode(RegisterMap(tags=[tag]), tag, -2.5) == [hi, lo]


def test_integers_out_of_range_are_clamped_not_crashing() -> None:
    tag = TagSpec(name="t", table="holding", address=0, type="int16")
    regmap = RegisterMap(tags=[tag])
    assert decode(regmap, tag, encode(regmap, tag, 1e9)) == 2**15 - 1
    assert decode(regmap, tag, encode(regmap, tag, -12.6)) == -13
