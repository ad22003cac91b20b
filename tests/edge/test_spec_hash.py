"""A manifest may name its spec by hash (FLM2): exactly one of spec and spec_hash, and a site checks the hash
against its own spec."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from aggregator.publish import build_release
from broker_bridge import envelope
from broker_bridge.errors import ModelRefused, WireError
from broker_bridge.federation_key import new_content_key
from broker_bridge.keys import KeyPair
from broker_bridge.topics import Topics
from edge.model_store import check_global_model
from models import ModelSpec

AGG = KeyPair.generate("aggregator", "aggregator")
PUB = bytes(AGG.signing_key.verify_key)
SPEC = ModelSpec.from_dict({"kind": "mlp", "n_features": 3, "hidden": [4]})
SHAPES = {"body.0.weight": (4, 3), "body.0.bias": (4,), "head.weight": (1, 4), "head.bias": (1,)}
MODEL = {n: np.full(s, 0.5, np.float32) for n, s in SHAPES.items()}


def _manifest(**fields) -> dict:
    doc = {
        "federation": "plant",
        "version": 1,
        "created_at": 0.0,
        "weights": {"hash": "0" * 64, "size": 0, "chunks": 0},
        "onnx": {"hash": "0" * 64, "size": 0, "chunks": 0},
    }
    return {**doc, **fields}


def test_the_spec_hash_is_the_first_16_bytes_of_sha256_over_the_canonical_spec() -> None:
    canonical = envelope.canonical_json(SPEC.to_dict())
    assert canonical.startswith(b'{"') and b" " not in canonical
    assert envelope.spec_hash(SPEC.to_dict()) == hashlib.sha256(canonical).hexdigest()[:32]


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({}, "exactly one of spec and spec_hash"),
        ({"spec": {}, "spec_hash": "0" * 32}, "exactly one of spec and spec_hash"),
        ({"spec_hash": "0" * 31}, "32 lowercase hex digits"),
        ({"spec_hash": "A" * 32}, "32 lowercase hex digits"),
        ({"spec_hash": 7}, "32 lowercase hex digits"),
    ],
)
def test_a_manifest_must_name_its_spec_once_and_well(fields: dict, match: str) -> None:
    with pytest.raises(WireError, match=match) as e:
        envelope.verify_manifest(envelope.sign_manifest(_manifest(**fields), AGG), PUB)
    assert e.value.reason == "schema"
    ok = envelope.verify_manifest(envelope.sign_manifest(_manifest(spec_hash="0a" * 16), AGG), PUB)
    assert ok["spec_hash"] == "0a" * 16 and "spec" not in ok


def _weights_and_manifest(spec_by_hash: bool, spec: ModelSpec = SPEC) -> tuple[bytes, bytes]:
    key = new_content_key()
    rel = build_release(
        1,
        MODEL,
        spec,
        "plant",
        AGG,
        Topics("plant"),
        lambda _t: 10**6,
        None,
        epoch=1,
        content_key=key,
        spec_by_hash=spec_by_hash,
    )
    weights = envelope.encode_tensors(MODEL)
    signed = envelope.sign_manifest(rel.manifest, AGG)
    return weights, signed


def test_a_site_takes_a_model_whose_spec_hash_is_its_own_and_refuses_another() -> None:
    weights, signed = _weights_and_manifest(spec_by_hash=True)
    doc = envelope.verify_manifest(signed, PUB)
    assert doc["spec_hash"] == envelope.spec_hash(SPEC.to_dict()) and "spec" not in doc
    g = check_global_model(signed, weights, PUB, "plant", SPEC, list(SHAPES), SHAPES)
    assert g.version == 1 and all(np.array_equal(g.shared[n], MODEL[n]) for n in SHAPES)
    other = ModelSpec.from_dict({"kind": "mlp", "n_features": 3, "hidden": [4], "task": "regression"})
    assert envelope.spec_hash(other.to_dict()) != doc["spec_hash"]
    with pytest.raises(ModelRefused) as e:
        check_global_model(signed, weights, PUB, "plant", other, list(SHAPES), SHAPES)
    assert e.value.reason == "spec" and "is not this site's" in e.value.detail
    # the whole spec, as before, still reads
    weights, signed = _weights_and_manifest(spec_by_hash=False)
    assert envelope.verify_manifest(signed, PUB)["spec"] == SPEC.to_dict()
    assert check_global_model(signed, weights, PUB, "plant", SPEC, list(SHAPES), SHAPES).version == 1
