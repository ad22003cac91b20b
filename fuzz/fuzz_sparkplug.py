"""Fuzz Sparkplug B payload decoding: bytes from any MQTT client on the plant network.

Until the adapter's own decoder lands (firmware_adapters/sparkplug/), this
fuzzes the protobuf bindings the adapter uses (``sparkplug_b_pb2.Payload``),
whose documented error is ``google.protobuf.message.DecodeError``, and then
reads every metric's value the way a consumer does (``WhichOneof``), so a
payload that parses but is odd (no value, unknown datatype) is exercised too.
"""
from __future__ import annotations

from google.protobuf.message import DecodeError

from _harness import ACCEPTED, instrumented, main

with instrumented():
    from firmware_adapters.sparkplug import sparkplug_b_pb2 as pb


def target(data: bytes) -> None:
    payload = pb.Payload.FromString(data)
    for metric in payload.metrics:
        which = metric.WhichOneof("value")
        if which is not None:
            getattr(metric, which)
        _ = (metric.name, metric.alias, metric.datatype, metric.timestamp)
    assert pb.Payload.FromString(payload.SerializeToString()) == payload


def seeds() -> list[bytes]:
    p = pb.Payload(timestamp=1_700_000_000_000, seq=3)
    m = p.metrics.add(name="Line1/Temperature", alias=1, datatype=10, double_value=21.5)
    p.metrics.add(name="Line1/Running", alias=2, datatype=11, boolean_value=True)
    p.metrics.add(name="Line1/Count", alias=3, datatype=7, long_value=12345)
    p.metrics.add(name="Line1/Mode", alias=4, datatype=12, string_value="auto")
    _ = m
    return [p.SerializeToString(), pb.Payload(seq=0).SerializeToString()]


if __name__ == "__main__":
    main(target, seeds(), ACCEPTED + (DecodeError,))
