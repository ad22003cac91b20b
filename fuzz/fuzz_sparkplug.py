"""Fuzz Sparkplug B decoding as the adapter does it: ``SparkplugSource.handle(topic, payload)``.

Anyone on the plant's MQTT broker can publish Sparkplug messages, so the
reader must turn any sequence of them into samples: good ones, or bad-quality
samples that say what was wrong (its documented contract: a bad payload is a
``Sample.bad``, never an exception). The input is a sequence of messages, each
``type byte | u16 length | payload``, fed to one fresh source, so births,
aliases, data before birth, sequence gaps and deaths interact. The codec's
own error for a metric without a scalar value, ``codec.Unsupported``, is
accepted too when it escapes.

Invariant: every sample is good with scalar values, or bad with no values.
"""
from __future__ import annotations

import asyncio
import struct

from _harness import ACCEPTED, instrumented, main

with instrumented():
    from fedline.config import parse
    from firmware_adapters.config import SparkplugConfig
    from firmware_adapters.sparkplug import codec
    from firmware_adapters.sparkplug import sparkplug_b_pb2 as pb
    from firmware_adapters.sparkplug.source import SparkplugSource

TYPES = ["NBIRTH", "NDATA", "DBIRTH", "DDATA", "NDEATH", "DDEATH", "NCMD", "STATE"]
CFG = parse(SparkplugConfig, {"kind": "sparkplug", "request_rebirth": False})
LOOP = asyncio.new_event_loop()


def messages(data: bytes):
    pos = 0
    while pos + 3 <= len(data):
        kind, n = data[pos], struct.unpack_from("<H", data, pos + 1)[0]
        payload = data[pos + 3:pos + 3 + n]
        pos += 3 + n
        mtype = TYPES[kind % len(TYPES)]
        device = "/dev1" if mtype.startswith("D") and kind & 0x80 else ""
        yield f"{codec.NAMESPACE}/g1/{mtype}/node1{device}", payload


def target(data: bytes) -> None:
    source = SparkplugSource(CFG)
    for topic, payload in messages(data):
        for sample in LOOP.run_until_complete(source.handle(topic, payload)):
            if sample.quality == "bad":
                assert not sample.values and sample.error, sample
            else:
                assert sample.values and all(v is None or isinstance(v, (bool, int, float, str))
                                             for v in sample.values.values()), sample


def _frame(kind: str, payload: bytes, device: bool = False) -> bytes:
    return bytes([TYPES.index(kind) | (0x80 if device else 0)]) + struct.pack("<H", len(payload)) + payload


def seeds() -> list[bytes]:
    birth = codec.build_payload([("bdSeq", None, pb.Int64, 0), ("Temp", 1, pb.Double, 21.5),
                                 ("Count", 2, pb.Int32, -3), ("Run", 3, pb.Boolean, True),
                                 ("Mode", 4, pb.String, "auto")], seq=0)
    data = codec.build_payload([(None, 1, pb.Double, 22.0), (None, 2, pb.Int32, 7)], seq=1)
    gap = codec.build_payload([(None, 1, pb.Double, 23.0), (None, 9, pb.Float, 1.0)], seq=5)
    return [_frame("NBIRTH", birth) + _frame("NDATA", data) + _frame("NDATA", gap),
            _frame("NDATA", data) + _frame("NBIRTH", birth),
            _frame("DBIRTH", birth, True) + _frame("DDATA", data, True) + _frame("DDEATH", b"", True),
            _frame("NBIRTH", birth) + _frame("NDEATH", b"") + _frame("NDATA", data)]


if __name__ == "__main__":
    main(target, seeds(), ACCEPTED + (codec.Unsupported,))
