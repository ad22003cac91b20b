"""The binary manifest (FLM version 3): hand-built bytes, every refusal by name, every forgery, the JSON
fall-back, and the sealed release read by the one opener every reader uses (edges, lines, the observer, a
plant's uplink: ``federation_key.open_manifest``)."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from aggregator.publish import build_release
from broker_bridge import binhead, envelope
from broker_bridge.errors import WireError
from broker_bridge.federation_key import new_content_key, open_manifest
from broker_bridge.keys import KeyPair
from broker_bridge.topics import Topics
from models import ModelSpec

AGG = KeyPair.generate("aggregator", "aggregator")
PUB = bytes(AGG.signing_key.verify_key)

DOC = {
    "federation": "plant",
    "version": 2,
    "epoch": 1,
    "created_at": 1.0e9,
    "spec_hash": "0a" * 16,
    "weights": {"hash": "ab" * 32, "size": 300, "chunks": 1, "msg_id": "v2-weights"},
    "onnx": {"hash": "cd" * 32, "size": 0, "chunks": 0, "msg_id": "v2-onnx"},
    "reads": ["FLT2", "FLU2"],
    "steps": True,
}
# key indices into binhead.MANIFEST_KEYS: federation 0, version 1, epoch 2, created_at 3, spec_hash 4, weights 5,
# onnx 6, reads 8, steps 9, hash 12, size 13, chunks 14. Tags: 3 text, 4 interned string, 5 LEB128, 1 f64,
# 6 map, 7 list of strings, 8 hex as raw bytes, 10 true. No msg_id: it is v<version>-<part>.
WEIGHTS = b"\x05\x06\x03" + b"\x0c\x08\x20" + b"\xab" * 32 + b"\x0d\x05\xac\x02" + b"\x0e\x05\x01"
ONNX = b"\x06\x06\x03" + b"\x0c\x08\x20" + b"\xcd" * 32 + b"\x0d\x05\x00" + b"\x0e\x05\x00"
BODY = (
    b"\x09"
    + b"\x00\x03\x05plant"
    + b"\x01\x05\x02"
    + b"\x02\x05\x01"
    + b"\x03\x01"
    + struct.pack("<d", 1.0e9)
    + b"\x04\x08\x10"
    + b"\x0a" * 16
    + WEIGHTS
    + ONNX
    + b"\x08\x07\x02\x04\x00\x04\x01"
    + b"\x09\x0a"
)


def _signed(body: bytes, keys: KeyPair = AGG, domain: bytes = b"fedline-manifest-v3\0", version: int = 3) -> bytes:
    sig = keys.signing_key.sign(hashlib.sha256(domain + body).digest()).signature
    return b"FLM" + bytes([version]) + sig + body


def test_a_hand_built_body_is_what_the_encoder_writes_and_verifies_signed() -> None:
    assert binhead.pack_manifest(DOC) == BODY
    assert binhead.unpack_manifest(memoryview(BODY)) == DOC  # the parts' msg_id put back
    signed = envelope.sign_manifest(DOC, AGG, binary=True)
    assert signed == _signed(BODY)  # the signature is over the v3 domain's digest of the body
    assert envelope.verify_manifest(signed, PUB) == DOC
    json_signed = envelope.sign_manifest(DOC, AGG)
    assert json_signed[:4] == b"FLM\x01" and envelope.verify_manifest(json_signed, PUB) == DOC
    assert len(json_signed) - len(signed) > 250  # about 480 JSON bytes against 200


def test_every_value_a_manifest_carries_round_trips() -> None:
    doc = {
        **DOC,
        "version": 70000,
        "delta": {"hash": "ef" * 32, "size": 1305, "chunks": 1, "msg_id": "v70000-delta", "from": 69999},
        "weights": {**DOC["weights"], "msg_id": "v70000-weights"},
        "onnx": {**DOC["onnx"], "msg_id": "v70000-onnx"},
        "metric": 0.8125,
        "upstream": {"federation": "central", "version": 12},
        "steps": False,
        "note": None,
        "offset": -3,
        "reads": [],
        "federation": "beef",  # a name that is also lowercase hex: carried as bytes, read back the same string
    }
    body = binhead.pack_manifest(doc)
    assert body is not None
    back = binhead.unpack_manifest(memoryview(body))
    assert back == doc and type(back["steps"]) is bool and type(back["metric"]) is float
    assert envelope.verify_manifest(envelope.sign_manifest(doc, AGG, binary=True), PUB) == doc


@pytest.mark.parametrize(
    "change",
    [
        {"spec": {"kind": "mlp", "mean": [0.5, 1.5]}},  # the whole spec (a list of floats)
        {"weights": {**DOC["weights"], "msg_id": "other"}},  # a part not named v<version>-<part>
        {"upstream": {"deeper": {"x": 1}}},  # a map inside a map
        {"reads": ["FLT2"] * 33},  # a list over 32 strings
        {"reads": [1, 2]},  # a list that is not of strings
        {"big": 2**64},
    ],
    ids=["whole-spec", "msg-id", "map-in-map", "long-list", "list-of-ints", "int>=2^64"],
)
def test_what_the_binary_form_cannot_hold_goes_as_json(change: dict) -> None:
    doc = {**DOC, **change}
    assert binhead.pack_manifest(doc) is None
    signed = envelope.sign_manifest(doc, AGG, binary=True)
    assert signed[:4] == b"FLM\x01"


def _refused(body: bytes) -> str:
    with pytest.raises(WireError) as e:
        envelope.verify_manifest(_signed(body), PUB)
    return f"{e.value.reason}: {e.value.detail}"


def test_malformed_bodies_are_refused_by_name_even_when_the_aggregator_signed_them() -> None:
    assert _refused(BODY + b"\x00") == "schema: binary manifest: 1 bytes after its last field"
    assert _refused(BODY[:-40]).startswith("schema: binary manifest is truncated")
    assert _refused(BODY[:20]).startswith("schema: binary manifest is truncated in field 'created_at'")
    nested = b"\x01\x05\x06\x01\x0b\x06\x00"  # weights = {upstream: {}}: a map inside a map
    assert _refused(nested) == "schema: binary manifest: field 'upstream' is a map inside a map"
    assert _refused(b"\x01\x08\x07\x21" + b"\x04\x00" * 33) == (
        "schema: binary manifest: field 'reads' lists 33 strings, at most 32"
    )
    assert _refused(b"\x01\x08\x07\x01\x05\x01") == (
        "schema: binary manifest: field 'reads' holds a value that is not a string"
    )
    assert _refused(b"\x01\x04\x08\x00") == "schema: binary manifest: field 'spec_hash' is empty hex"
    assert _refused(b"\x01\x09\x0b") == "schema: binary manifest: field 'steps' has unknown tag 11"
    assert _refused(b"\x01\x00\x04\x07").startswith("schema: binary manifest: field 'federation' names string 7")
    by_name = b"\x01\x05\x06\x01" + b"\xff\x06msg_id" + b"\x03\x02v2"  # weights = {msg_id: "v2"}, a key by name
    assert _refused(by_name) == "schema: binary manifest: weights carries a msg_id (it is v<version>-weights)"
    assert _refused(b"\x02\x01\x05\x01\x01\x05\x02") == "schema: binary manifest: field 'version' twice"
    # the fields a manifest needs, as for JSON
    assert _refused(b"\x01\x01\x05\x02") == "schema: manifest lacks federation, created_at, weights, onnx"
    assert _refused(BODY.replace(b"\x04\x08\x10" + b"\x0a" * 16, b"\x04\x03\x02xy")) == (
        "schema: manifest spec_hash must be 32 lowercase hex digits"
    )


def test_the_extended_tags_are_a_manifests_only() -> None:
    """The update header and the receipt decode exactly as before: a true, a map or hex bytes there are
    unknown tags, and their encoders still send a bool as JSON."""
    with pytest.raises(WireError, match="field 'steps' has unknown tag 10"):
        binhead.unpack_receipt(memoryview(b"\x01\xff\x05steps\x0a"))
    with pytest.raises(WireError, match="unknown tag 8"):
        binhead.unpack_receipt(memoryview(b"\x01\x02\x08\x01\xab"))
    assert binhead.pack_receipt({"site": "a", "flag": True}) is None
    assert binhead.pack_receipt({"site": "a", "msg_id": "ab"}) == b"\x02\x00\x03\x01a\x02\x03\x02ab"  # text, not hex


def test_every_forgery_fails() -> None:
    site = KeyPair.generate("site", "site-a")
    for forged in (
        _signed(BODY, keys=site),  # signed by a site, not the aggregator
        _signed(BODY, domain=b"fedline-manifest-v1\0"),  # a v1 signature over a binary body
        _signed(BODY)[:-1] + bytes([BODY[-1] ^ 1]),  # a flipped byte
        _signed(BODY)[:3] + b"\x01" + _signed(BODY)[4:],  # the v3 signature presented as JSON
    ):
        with pytest.raises(WireError) as e:
            envelope.verify_manifest(forged, PUB)
        assert e.value.reason == "signature"
    with pytest.raises(WireError, match="not the size of a manifest"):
        envelope.verify_manifest(_signed(b"\x00" * (envelope.MAX_HEADER_BYTES + 1)), PUB)


def test_a_release_with_a_binary_manifest_opens_as_every_reader_opens_it() -> None:
    spec = ModelSpec.from_dict({"kind": "mlp", "n_features": 3, "hidden": [4]})
    model = {"body.0.weight": np.ones((4, 3), np.float32), "body.0.bias": np.zeros(4, np.float32)}
    key = new_content_key()

    def release(binary: bool):
        return build_release(
            5, model, spec, "plant", AGG, Topics("plant"), lambda _t: 10**6, None, epoch=1, content_key=key,
            metric=0.75, spec_by_hash=True, steps=True, binary_manifest=binary,
        )  # fmt: skip

    new, old = release(True), release(False)
    doc, inner = open_manifest(new.manifest_blob, {1: key}, PUB)
    assert inner[:4] == b"FLM\x03" and doc == new.manifest
    assert doc["weights"]["msg_id"] == "v5-weights" and doc["steps"] is True
    old_doc, old_inner = open_manifest(old.manifest_blob, {1: key}, PUB)
    assert old_inner[:4] == b"FLM\x01" and old_doc == {**doc, "created_at": old_doc["created_at"]}
    assert len(old.manifest_blob) - len(new.manifest_blob) > 250  # 545 against 272 bytes sealed
