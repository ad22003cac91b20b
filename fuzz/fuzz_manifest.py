"""Fuzz ``envelope.verify_manifest``: what an edge and a line check before loading a model.

First byte 0: the bytes as published on the model topic (an outsider, no key);
1: a body signed by a key that is not the aggregator's (must never verify);
2: a body signed by the aggregator itself (reaches the JSON and schema checks);
3 and 4: as 1 and 2 for a binary body (FLM version 3, ``binhead.pack_manifest``): 4 reaches the binary
decoder, and whatever it reads must pack again to a body that reads the same.
"""

from __future__ import annotations

from _harness import AGGREGATOR, OUTSIDER, instrumented, main

with instrumented():
    from broker_bridge import binhead, envelope

AGG_PUB = bytes(AGGREGATOR.signing_key.verify_key)


def _signed(keys, body: bytes) -> bytes:
    return envelope.sign_body(envelope._MANIFEST_MAGIC, envelope._MANIFEST_DOMAIN, body, keys)


def _signed_binary(keys, body: bytes) -> bytes:
    sig = keys.signing_key.sign(envelope.digest(body, envelope._MANIFEST_DOMAIN_V3)).signature
    return envelope._MANIFEST_MAGIC + bytes([envelope.BINARY_MANIFEST_VERSION]) + sig + body


def target(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 5, data[1:]
    if mode == 0:
        blob = body
    elif mode in (1, 2):
        blob = _signed(OUTSIDER if mode == 1 else AGGREGATOR, body)
    else:
        blob = _signed_binary(OUTSIDER if mode == 3 else AGGREGATOR, body)
    doc = envelope.verify_manifest(blob, AGG_PUB)
    assert mode not in (1, 3), "a manifest signed by another key verified"
    assert isinstance(doc["version"], int) and doc["version"] >= 0
    if mode == 4:
        again = binhead.pack_manifest(doc)
        assert again is not None and binhead.unpack_manifest(memoryview(again)) == doc


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
    binary = {
        **{k: v for k, v in doc.items() if k != "spec"},
        "spec_hash": "0a" * 16,
        "epoch": 1,
        "weights": {**doc["weights"], "msg_id": "v3-weights"},
        "onnx": {**doc["onnx"], "msg_id": "v3-onnx"},
        "delta": {"hash": "ef" * 32, "size": 50, "chunks": 1, "msg_id": "v3-delta", "from": 2},
        "reads": ["FLT2", "FLU2"],
        "steps": True,
        "upstream": {"federation": "central", "version": 9},
    }
    packed = binhead.pack_manifest(binary)
    assert packed is not None
    return [
        b"\x00" + envelope.sign_manifest(doc, AGGREGATOR),
        b"\x01" + body,
        b"\x02" + body,
        b"\x02" + envelope.canonical_json({**doc, "version": -1}),
        b"\x00" + envelope.sign_manifest(binary, AGGREGATOR, binary=True),
        b"\x03" + packed,
        b"\x04" + packed,
    ]


if __name__ == "__main__":
    main(target, seeds())
