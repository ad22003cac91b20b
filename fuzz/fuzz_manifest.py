"""Fuzz ``envelope.verify_manifest``: what an edge and a line check before loading a model.

First byte 0: the bytes as published on the model topic (an outsider, no key);
1: a body signed by a key that is not the aggregator's (must never verify);
2: a body signed by the aggregator itself (reaches the JSON and schema checks).
"""

from __future__ import annotations

from _harness import AGGREGATOR, OUTSIDER, instrumented, main

with instrumented():
    from broker_bridge import envelope

AGG_PUB = bytes(AGGREGATOR.signing_key.verify_key)


def _signed(keys, body: bytes) -> bytes:
    return envelope.sign_body(envelope._MANIFEST_MAGIC, envelope._MANIFEST_DOMAIN, body, keys)


def target(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 3, data[1:]
    blob = body if mode == 0 else _signed(OUTSIDER if mode == 1 else AGGREGATOR, body)
    doc = envelope.verify_manifest(blob, AGG_PUB)
    assert mode != 1, "a manifest signed by another key verified"
    assert isinstance(doc["version"], int) and doc["version"] >= 0


def seeds() -> list[bytes]:
    doc = {
        "federation": "fuzz",
        "version": 3,
        "created_at": 1.0e9,
        "spec": {"kind": "mlp", "n_features": 3},
        "weights": {"hash": "ab" * 32, "size": 100, "chunks": 1},
        "onnx": {"hash": "cd" * 32, "size": 200, "chunks": 1},
    }
    body = envelope.canonical_json(doc)
    return [
        b"\x00" + envelope.sign_manifest(doc, AGGREGATOR),
        b"\x01" + body,
        b"\x02" + body,
        b"\x02" + envelope.canonical_json({**doc, "version": -1}),
    ]


if __name__ == "__main__":
    main(target, seeds())
