"""Sparkplug B payloads: metric values, the Quality property and bdSeq, in and out of protobuf.

Each datatype has its value in one field of the metric's ``value`` oneof
(Sparkplug 3.0 §6.4.16 "Datatype Details"): Int8..Int32 and UInt8..UInt32 in
``int_value`` (uint32), Int64, UInt64 and DateTime in ``long_value`` (uint64),
Float, Double, Boolean and String/Text/UUID in their own fields. UInt32 is also
accepted from ``long_value``, as Eclipse Tahu's decoder does, because Tahu's
Java encoder (and Ignition) put it there. A value in any other field is a
:class:`WrongField` error, never a silent 0: protobuf returns 0 for a field
that is not set, which would train as a real reading.

Signed integers are two's complement in the unsigned field. Encoders differ in
width (Java sign-extends an Int8 to 32 bits, others keep 8), so a signed value
is accepted at its own width or sign-extended to the field's; anything else
(an Int8 of 300, a UInt16 of 70000, a UInt32 above 2**32 in ``long_value``) is
out of range and a :class:`WrongField` too.

The ``Quality`` property (§6.4.7: Int32 in ``int_value``; 0 BAD, 192 GOOD,
500 STALE) maps to a sample quality as the OPC UA source maps status codes:
GOOD is good, STALE is "uncertain" (the last usable value), BAD and any code
the specification does not define are bad.

Decoding must know the datatype, which DATA messages usually omit: the reader
keeps it from the BIRTH. DataSet, Template, Bytes, File and arrays have no
scalar sample value and are :class:`Unsupported`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from firmware_adapters.sample import Quality
from firmware_adapters.sparkplug import sparkplug_b_pb2 as _pb2

# protoc's generated module has no type information (mypy excludes it): its names are looked up at run time
pb: Any = _pb2

NAMESPACE = "spBv1.0"
REBIRTH_METRIC = "Node Control/Rebirth"
BDSEQ_METRIC = "bdSeq"
QUALITY_PROPERTY = "Quality"

#: the value field(s) each scalar datatype may use
FIELDS: dict[int, tuple[str, ...]] = {
    pb.Int8: ("int_value",),
    pb.Int16: ("int_value",),
    pb.Int32: ("int_value",),
    pb.UInt8: ("int_value",),
    pb.UInt16: ("int_value",),
    pb.UInt32: ("int_value", "long_value"),
    pb.Int64: ("long_value",),
    pb.UInt64: ("long_value",),
    pb.DateTime: ("long_value",),
    pb.Float: ("float_value",),
    pb.Double: ("double_value",),
    pb.Boolean: ("boolean_value",),
    pb.String: ("string_value",),
    pb.Text: ("string_value",),
    pb.UUID: ("string_value",),
}
_WIDTH = {
    pb.Int8: 8,
    pb.Int16: 16,
    pb.Int32: 32,
    pb.Int64: 64,
    pb.UInt8: 8,
    pb.UInt16: 16,
    pb.UInt32: 32,
    pb.UInt64: 64,
}
_SIGNED = {pb.Int8, pb.Int16, pb.Int32, pb.Int64}
_FIELD_BITS = {"int_value": 32, "long_value": 64}

#: Quality property code -> (sample quality, why)
QUALITY_CODES: dict[int, tuple[Quality, str | None]] = {
    192: ("good", None),
    500: ("uncertain", "STALE (500)"),
    0: ("bad", "BAD (0)"),
}


class Unsupported(ValueError):
    """A metric type that has no scalar sample value (DataSet, Template, arrays...)."""


class WrongField(ValueError):
    """A value in a field its datatype does not use, or out of the datatype's range."""


def type_name(datatype: int) -> str:
    return pb.DataType.Name(datatype) if datatype in pb.DataType.values() else f"datatype {datatype}"


def _integer(raw: int, datatype: int, fieldname: str) -> int:
    bits, field_bits = _WIDTH[datatype], _FIELD_BITS[fieldname]
    if datatype in _SIGNED:
        own = raw < (1 << bits)
        extended = raw >= (1 << field_bits) - (1 << (bits - 1))
        if not (own or extended):
            raise WrongField(f"{raw} in {fieldname} is not a {type_name(datatype)}")
        raw &= (1 << bits) - 1
        return raw - (1 << bits) if raw >= 1 << (bits - 1) else raw
    if raw >= 1 << bits:
        raise WrongField(f"{raw} in {fieldname} is out of range for {type_name(datatype)}")
    return raw


def metric_value(metric: Any, datatype: int) -> float | int | bool | str | None:
    """The Python value of one metric, given its datatype (from the metric or its BIRTH).

    Raises :class:`WrongField` and :class:`Unsupported` (both ``ValueError``).
    """
    if metric.is_null:
        return None
    allowed = FIELDS.get(datatype)
    if allowed is None:
        raise Unsupported(type_name(datatype))
    got = metric.WhichOneof("value")
    if got not in allowed:
        raise WrongField(f"{type_name(datatype)} value in {got or 'no value field'}, expected {' or '.join(allowed)}")
    raw = getattr(metric, got)
    if datatype in _WIDTH:
        return _integer(int(raw), datatype, got)
    if datatype == pb.DateTime:
        return int(raw)  # milliseconds since the epoch, UTC
    if datatype in (pb.Float, pb.Double):
        return float(raw)
    if datatype == pb.Boolean:
        return bool(raw)
    return str(raw)


def quality_code(metric: Any) -> int | None:
    """The metric's ``Quality`` property code, or None when it has none (implied GOOD).

    Raises :class:`WrongField` for a property set whose keys and values differ in
    number, or a Quality that is not an integer.
    """
    if not metric.HasField("properties"):
        return None
    props = metric.properties
    if len(props.keys) != len(props.values):
        raise WrongField(f"PropertySet with {len(props.keys)} keys and {len(props.values)} values")
    for key, value in zip(props.keys, props.values):
        if key != QUALITY_PROPERTY:
            continue
        if value.is_null:
            return None
        got = value.WhichOneof("value")
        if got not in _FIELD_BITS:
            raise WrongField(f"Quality property in {got or 'no value field'}, expected int_value")
        return _integer(int(getattr(value, got)), pb.Int32 if got == "int_value" else pb.Int64, got)
    return None


def quality_of(code: int | None) -> tuple[Quality, str | None]:
    """(sample quality, why) for a Quality code; None (no property) is GOOD."""
    if code is None:
        return "good", None
    return QUALITY_CODES.get(code, ("bad", f"{code} (not 0, 192 or 500)"))


def bdseq_of(payload: Any) -> int | None:
    """The ``bdSeq`` metric of an NBIRTH or NDEATH (Int64 by the spec; any integer type is read)."""
    for m in payload.metrics:
        if m.HasField("name") and m.name == BDSEQ_METRIC:
            got = m.WhichOneof("value")
            if got in _FIELD_BITS:
                return int(getattr(m, got))
            return None
    return None


def set_metric_value(metric: Any, datatype: int, value: Any) -> None:
    """Fill one metric's value field per the specification (the inverse of :func:`metric_value`)."""
    metric.datatype = datatype
    fieldname = FIELDS.get(datatype, (None,))[0]
    if value is None:
        metric.is_null = True
    elif fieldname == "int_value":
        metric.int_value = int(value) & 0xFFFFFFFF
    elif fieldname == "long_value":
        metric.long_value = int(value) & 0xFFFFFFFFFFFFFFFF
    elif fieldname in ("float_value", "double_value"):
        setattr(metric, fieldname, float(value))
    elif fieldname == "boolean_value":
        metric.boolean_value = bool(value)
    elif fieldname == "string_value":
        metric.string_value = str(value)
    else:
        raise Unsupported(type_name(datatype))


def build_payload(
    metrics: Iterable[tuple[str | None, int | None, int, Any]],
    seq: int | None = None,
    timestamp_ms: int | None = None,
) -> bytes:
    """Encode a payload from ``(name, alias, datatype, value)`` tuples.

    For edge-node simulators, tests, and the reader's rebirth command.
    """
    p = pb.Payload()
    p.timestamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    if seq is not None:
        p.seq = seq
    for name, alias, datatype, value in metrics:
        m = p.metrics.add()
        if name is not None:
            m.name = name
        if alias is not None:
            m.alias = alias
        set_metric_value(m, datatype, value)
    return p.SerializeToString()


def rebirth_command() -> bytes:
    """The NCMD payload asking an edge node to republish its BIRTH messages."""
    return build_payload([(REBIRTH_METRIC, None, pb.Boolean, True)])


def parse_topic(topic: str) -> tuple[str, str, str, str | None] | None:
    """``spBv1.0/group/TYPE/node[/device]`` -> (group, type, node, device), else None."""
    parts = topic.split("/")
    if len(parts) not in (4, 5) or parts[0] != NAMESPACE:
        return None
    return parts[1], parts[2], parts[3], parts[4] if len(parts) == 5 else None


def state_topic(host_id: str) -> str:
    """The Sparkplug 3.0 Host Application STATE topic."""
    return f"{NAMESPACE}/STATE/{host_id}"
