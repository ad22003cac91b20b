"""Sparkplug B test vectors encoded as Eclipse Tahu's Java encoder encodes them.

``python tests/adapters/sparkplug_vectors.py`` rewrites
``tests/adapters/data/sparkplug_tahu_vectors.json``; the tests check that the
committed file equals what this writes, and decode every vector.

Why a hand-written wire encoder instead of our generated protobuf module: the
vectors must not share code with the decoder under test. The rules below are
those of Tahu's ``SparkplugBPayloadEncoder`` (java/lib/core, read, not copied):

- fields are written in field-number order (protobuf-java does), so a metric
  is name, alias, timestamp, datatype, is_historical, properties, value;
- Int8 / Int16 / Int32 are Java ints put in the uint32 ``int_value``: a
  negative one is sign-extended to 32 bits (a 5-byte varint);
- UInt8 / UInt16 go to ``int_value``; **UInt32 goes to ``long_value``**
  (``setLongValue(Long.parseUnsignedLong(...))``), unlike the spec's table;
- Int64, UInt64 (low 64 bits of the BigInteger) and DateTime (epoch ms) go
  to ``long_value`` as 64-bit two's complement;
- Float / Double are fixed32 / fixed64 little endian;
- the ``Quality`` property is a PropertyValue of type Int32 (3) in
  ``int_value``; a PropertySet writes all keys, then all values;
- DATA messages are encoded with ``stripDataTypes`` (no datatype) and with
  aliases only, as Tahu's edge node does when aliases are on;
- ``is_historical`` is written only when the metric has it set.

Two vectors are not Tahu's: ``ndata-uint32-in-int-value`` (a spec-table
encoder, as the C and Python ones, puts UInt32 in ``int_value``) and
``ndata-wrong-field`` (an encoder bug: a Double in ``float_value``).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

HERE = Path(__file__).parent
VECTORS_FILE = HERE / "data" / "sparkplug_tahu_vectors.json"
GROUP, NODE, DEVICE = "plant1", "line7", "press"
T0 = 1_700_000_000_000  # payload timestamps (ms) are T0 + n; metric timestamps are set per metric below

# Sparkplug datatypes (specification §6.4.16)
Int8, Int16, Int32, Int64, UInt8, UInt16, UInt32, UInt64 = 1, 2, 3, 4, 5, 6, 7, 8
Float, Double, Boolean, String, DateTime, Text = 9, 10, 11, 12, 13, 14


# ------------------------------------------------------------------ protobuf wire format, by hand


def varint(n: int) -> bytes:
    assert n >= 0
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tag(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def f_varint(field: int, n: int) -> bytes:
    return tag(field, 0) + varint(n)


def f_bytes(field: int, data: bytes) -> bytes:
    return tag(field, 2) + varint(len(data)) + data


def java_int(v: int) -> int:
    """A Java int written to a uint32 field: its 32-bit two's complement."""
    return v & 0xFFFFFFFF


def java_long(v: int) -> int:
    """A Java long written to a uint64 field: its 64-bit two's complement."""
    return v & 0xFFFFFFFFFFFFFFFF


def value_field(datatype: int, value: object) -> bytes:
    """The metric's value, in the field Tahu's Java encoder uses for ``datatype``."""
    if datatype in (Int8, Int16, Int32, UInt8, UInt16):
        return f_varint(10, java_int(int(value)))  # type: ignore[arg-type]
    if datatype in (UInt32, Int64, UInt64, DateTime):
        return f_varint(11, java_long(int(value)))  # type: ignore[arg-type]
    if datatype == Float:
        return tag(12, 5) + struct.pack("<f", value)
    if datatype == Double:
        return tag(13, 1) + struct.pack("<d", value)
    if datatype == Boolean:
        return f_varint(14, int(bool(value)))
    if datatype in (String, Text):
        return f_bytes(15, str(value).encode())
    raise ValueError(datatype)


def quality(code: int) -> bytes:
    """``properties`` = PropertySet{keys: ["Quality"], values: [PropertyValue{type: Int32, int_value: code}]}."""
    prop_value = f_varint(1, Int32) + f_varint(3, java_int(code))
    return f_bytes(9, f_bytes(1, b"Quality") + f_bytes(2, prop_value))


def metric(
    *,
    name: str | None = None,
    alias: int | None = None,
    ts: int | None = None,
    datatype: int | None = None,
    value: object = None,
    historical: bool = False,
    quality_code: int | None = None,
    raw_value: bytes | None = None,
    value_type: int | None = None,
) -> bytes:
    """One Metric message. ``datatype`` is written (BIRTH) unless None (stripped, DATA);
    ``value_type`` picks the value field when the datatype is stripped."""
    out = b""
    if name is not None:
        out += f_bytes(1, name.encode())
    if alias is not None:
        out += f_varint(2, alias)
    if ts is not None:
        out += f_varint(3, ts)
    if datatype is not None:
        out += f_varint(4, datatype)
    if historical:
        out += f_varint(5, 1)
    if quality_code is not None:
        out += quality(quality_code)
    out += raw_value if raw_value is not None else value_field(datatype or value_type or 0, value)
    return out


def payload(ts: int, metrics: list[bytes], seq: int | None) -> bytes:
    out = f_varint(1, ts)
    for m in metrics:
        out += f_bytes(2, m)
    if seq is not None:
        out += f_varint(3, seq)
    return out


# ------------------------------------------------------------------ the vectors


def build_vectors() -> list[dict[str, str]]:
    node = f"spBv1.0/{GROUP}/{{}}/{NODE}"
    dev = node + f"/{DEVICE}"
    births = [
        metric(name="bdSeq", ts=T0, datatype=Int64, value=3),
        metric(name="Node Control/Rebirth", ts=T0, datatype=Boolean, value=False),
        metric(name="Temperature", alias=1, ts=T0 - 1000, datatype=Double, value=21.5),
        metric(name="Counter", alias=2, ts=T0 - 900, datatype=UInt32, value=4_000_000_000),
        metric(name="Offset", alias=3, ts=T0 - 800, datatype=Int8, value=-5),
        metric(name="Level", alias=4, ts=T0 - 700, datatype=Int16, value=-300),
        metric(name="Total", alias=5, ts=T0 - 600, datatype=Int64, value=-(2**40)),
        metric(name="Serial", alias=6, ts=T0 - 500, datatype=UInt64, value=2**64 - 2),
        metric(name="Small", alias=7, ts=T0 - 400, datatype=UInt8, value=200),
        metric(name="Word", alias=8, ts=T0 - 300, datatype=UInt16, value=65535),
        metric(name="Ratio", alias=9, ts=T0 - 200, datatype=Float, value=0.25),
        metric(name="Running", alias=10, ts=T0 - 100, datatype=Boolean, value=True),
        metric(name="Batch", alias=11, ts=T0, datatype=String, value="B-17"),
        metric(name="Started", alias=12, ts=T0, datatype=DateTime, value=1_699_990_000_000),
        metric(name="Pressure", alias=13, ts=T0, datatype=Double, value=4.5, quality_code=500),
        metric(name="Vibration", alias=14, ts=T0, datatype=Float, value=1.0, quality_code=0),
    ]
    vectors = [
        ("nbirth", node.format("NBIRTH"), payload(T0, births, 0)),
        (
            "dbirth",
            dev.format("DBIRTH"),
            payload(
                T0 + 1,
                [
                    metric(name="Force", alias=20, ts=T0 + 1, datatype=Int32, value=-123456),
                    metric(name="Mode", alias=21, ts=T0 + 1, datatype=Text, value="auto"),
                    metric(name="Cycles", alias=22, ts=T0 + 1, datatype=UInt32, value=7),
                ],
                1,
            ),
        ),
        (
            "ndata-aliases-stripped",
            node.format("NDATA"),
            payload(
                T0 + 2000,
                [
                    metric(alias=1, ts=T0 + 1990, value_type=Double, value=22.0),
                    metric(alias=2, ts=T0 + 1995, value_type=UInt32, value=2**32 - 1),
                    metric(alias=3, ts=T0 + 1995, value_type=Int8, value=-128),
                    metric(alias=13, ts=T0 + 1998, value_type=Double, value=4.75),  # no Quality property: GOOD again
                ],
                2,
            ),
        ),
        (
            "ddata-historical",
            dev.format("DDATA"),
            payload(
                T0 + 3000,
                [
                    metric(alias=20, ts=T0 - 60_000, value_type=Int32, value=-1, historical=True),
                    metric(alias=20, ts=T0 - 30_000, value_type=Int32, value=-2, historical=True),
                    metric(alias=21, ts=T0 - 30_000, value_type=Text, value="manual", historical=True),
                    metric(alias=22, ts=T0 + 2999, value_type=UInt32, value=8),
                ],
                3,
            ),
        ),
        (
            "ndata-uint32-in-int-value",
            node.format("NDATA"),
            payload(
                T0 + 4000,
                [
                    metric(alias=2, ts=T0 + 4000, raw_value=f_varint(10, 3_000_000_000)),
                ],
                4,
            ),
        ),
        (
            "ndata-wrong-field",
            node.format("NDATA"),
            payload(
                T0 + 5000,
                [
                    metric(
                        alias=1, ts=T0 + 5000, raw_value=tag(12, 5) + struct.pack("<f", 23.0)
                    ),  # Double in float_value
                    metric(alias=7, ts=T0 + 5000, raw_value=f_varint(10, 300)),  # a UInt8 of 300
                    metric(alias=10, ts=T0 + 5000, value_type=Boolean, value=False),
                ],
                5,
            ),
        ),
        (
            "ndeath-previous-session",
            node.format("NDEATH"),
            payload(
                T0 - 86_400_000,
                [
                    metric(name="bdSeq", ts=T0 - 86_400_000, datatype=Int64, value=2),
                ],
                None,
            ),
        ),
        (
            "ndeath",
            node.format("NDEATH"),
            payload(
                T0 - 10,
                [
                    metric(name="bdSeq", ts=T0 - 10, datatype=Int64, value=3),
                ],
                None,
            ),
        ),
    ]
    return [{"name": n, "topic": t, "payload_hex": p.hex()} for n, t, p in vectors]


def main() -> None:
    VECTORS_FILE.parent.mkdir(exist_ok=True)
    VECTORS_FILE.write_text(
        json.dumps(
            {
                "about": "Sparkplug B payloads encoded by Eclipse Tahu's Java encoder rules; "
                "see tests/adapters/sparkplug_vectors.py",
                "vectors": build_vectors(),
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
