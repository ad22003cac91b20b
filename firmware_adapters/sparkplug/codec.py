"""Sparkplug B payloads: metric values in and out of the protobuf encoding.

Sparkplug carries signed integers as two's complement in unsigned fields
(Int8..Int32 in ``int_value``, a uint32; Int64 in ``long_value``, a uint64);
we write them sign-extended to the field's width and read only the type's own
bits, so payloads from either kind of encoder decode. Decoding therefore
must know the metric's datatype, which DATA messages usually omit:
the reader keeps it from the BIRTH. Only scalar types become sample values;
DataSet, Template, Bytes, File and arrays are reported as unsupported.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from firmware_adapters.sparkplug import sparkplug_b_pb2 as pb

NAMESPACE = "spBv1.0"
REBIRTH_METRIC = "Node Control/Rebirth"
BDSEQ_METRIC = "bdSeq"

_SIGNED_BITS = {pb.Int8: 8, pb.Int16: 16, pb.Int32: 32, pb.Int64: 64}
_INT_FIELD = {pb.Int8, pb.Int16, pb.Int32, pb.UInt8, pb.UInt16, pb.UInt32}
_LONG_FIELD = {pb.Int64, pb.UInt64, pb.DateTime}
_STRING_TYPES = {pb.String, pb.Text, pb.UUID}


class Unsupported(ValueError):
    """A metric type that has no scalar sample value (DataSet, Template, arrays...)."""


def metric_value(metric: Any, datatype: int) -> float | int | bool | str | None:
    """The Python value of one metric, given its datatype (from the metric or its BIRTH)."""
    if metric.is_null:
        return None
    if datatype in _INT_FIELD or datatype in _LONG_FIELD:
        raw = metric.int_value if datatype in _INT_FIELD else metric.long_value
        bits = _SIGNED_BITS.get(datatype)
        if bits is not None:
            # encoders differ: Java sign-extends an Int8 to 32 bits, others keep 8; the low bits agree
            raw &= (1 << bits) - 1
            if raw >= 1 << (bits - 1):
                raw -= 1 << bits
        return int(raw)
    if datatype == pb.Float:
        return float(metric.float_value)
    if datatype == pb.Double:
        return float(metric.double_value)
    if datatype == pb.Boolean:
        return bool(metric.boolean_value)
    if datatype in _STRING_TYPES:
        return str(metric.string_value)
    raise Unsupported(f"datatype {pb.DataType.Name(datatype) if datatype in pb.DataType.values() else datatype}")


def set_metric_value(metric: Any, datatype: int, value: Any) -> None:
    """Fill one metric's value field per Sparkplug's rules (the inverse of :func:`metric_value`)."""
    metric.datatype = datatype
    if value is None:
        metric.is_null = True
    elif datatype in _INT_FIELD:
        metric.int_value = int(value) & 0xFFFFFFFF
    elif datatype in _LONG_FIELD:
        metric.long_value = int(value) & 0xFFFFFFFFFFFFFFFF
    elif datatype == pb.Float:
        metric.float_value = float(value)
    elif datatype == pb.Double:
        metric.double_value = float(value)
    elif datatype == pb.Boolean:
        metric.boolean_value = bool(value)
    elif datatype in _STRING_TYPES:
        metric.string_value = str(value)
    else:
        raise Unsupported(f"datatype {datatype}")


def build_payload(
    metrics: Iterable[tuple[str | None, int | None, int, Any]], seq: int | None = None, timestamp_ms: int | None = None,
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
