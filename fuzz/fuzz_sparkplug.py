"""Fuzz Sparkplug B decoding as the adapter does it: ``SparkplugSource.handle(topic, payload)``.

Anyone on the plant's MQTT broker can publish Sparkplug messages, so the
reader must turn any sequence of them into samples: good ones, or samples
that say what was wrong (its documented contract: a bad payload, a value in
the wrong field, a bad Quality is a sample, never an exception). The input is
a sequence of messages, each ``type byte | u16 length | payload``, fed to one
fresh source configured as a Host Application (so its own STATE topic is
parsed too), so births, aliases, data before birth, sequence gaps, bdSeq
checks on deaths and historical metrics interact. The codec's own error for
a metric without a scalar value, ``codec.Unsupported``, is accepted too when
it escapes.

Invariant: a good or uncertain sample has scalar values; a bad one has an
error and no value but None; ``historical`` is a bool.
"""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

from _harness import ACCEPTED, instrumented, main

with instrumented():
    from fedline.config import parse
    from firmware_adapters.config import SparkplugConfig
    from firmware_adapters.sparkplug import codec
    from firmware_adapters.sparkplug import sparkplug_b_pb2 as pb
    from firmware_adapters.sparkplug.source import SparkplugSource

TYPES = ["NBIRTH", "NDATA", "DBIRTH", "DDATA", "NDEATH", "DDEATH", "NCMD", "STATE"]
CFG = parse(SparkplugConfig, {"kind": "sparkplug", "host_id": "h1", "request_rebirth": False})
LOOP = asyncio.new_event_loop()
VECTORS = Path(__file__).resolve().parent.parent / "tests" / "adapters" / "data" / "sparkplug_tahu_vectors.json"


def messages(data: bytes):
    pos = 0
    while pos + 3 <= len(data):
        kind, n = data[pos], struct.unpack_from("<H", data, pos + 1)[0]
        payload = data[pos + 3 : pos + 3 + n]
        pos += 3 + n
        mtype = TYPES[kind % len(TYPES)]
        if mtype == "STATE":
            yield codec.state_topic("h1"), payload
            continue
        device = "/dev1" if mtype.startswith("D") and kind & 0x80 else ""
        yield f"{codec.NAMESPACE}/g1/{mtype}/node1{device}", payload


def target(data: bytes) -> None:
    source = SparkplugSource(CFG)
    for topic, payload in messages(data):
        for sample in LOOP.run_until_complete(source.handle(topic, payload)):
            assert isinstance(sample.historical, bool), sample
            if sample.quality == "bad":
                assert sample.error and all(v is None for v in sample.values.values()), sample
            else:
                assert sample.values and all(
                    v is None or isinstance(v, (bool, int, float, str)) for v in sample.values.values()
                ), sample
                assert (sample.quality == "good") == (sample.error is None), sample


def _frame(kind: str, payload: bytes, device: bool = False) -> bytes:
    return bytes([TYPES.index(kind) | (0x80 if device else 0)]) + struct.pack("<H", len(payload)) + payload


def seeds() -> list[bytes]:
    birth = codec.build_payload(
        [
            ("bdSeq", None, pb.Int64, 0),
            ("Temp", 1, pb.Double, 21.5),
            ("Count", 2, pb.Int32, -3),
            ("Run", 3, pb.Boolean, True),
            ("Mode", 4, pb.String, "auto"),
        ],
        seq=0,
    )
    data = codec.build_payload([(None, 1, pb.Double, 22.0), (None, 2, pb.Int32, 7)], seq=1)
    gap = codec.build_payload([(None, 1, pb.Double, 23.0), (None, 9, pb.Float, 1.0)], seq=5)
    tahu = [bytes.fromhex(v["payload_hex"]) for v in json.loads(VECTORS.read_text())["vectors"]]
    kinds = ["NBIRTH", "DBIRTH", "NDATA", "DDATA", "NDATA", "NDATA", "NDEATH", "NDEATH"]
    tahu_run = b"".join(_frame(k, p, k.startswith("D")) for k, p in zip(kinds, tahu))
    return [
        tahu_run,
        _frame("STATE", b'{"online": false, "timestamp": 1}'),
        _frame("NBIRTH", birth) + _frame("NDATA", data) + _frame("NDATA", gap),
        _frame("NDATA", data) + _frame("NBIRTH", birth),
        _frame("DBIRTH", birth, True) + _frame("DDATA", data, True) + _frame("DDEATH", b"", True),
        _frame("NBIRTH", birth) + _frame("NDEATH", b"") + _frame("NDATA", data),
    ]


if __name__ == "__main__":
    main(target, seeds(), (*ACCEPTED, codec.Unsupported))
