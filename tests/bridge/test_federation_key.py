"""Members-only formats (``broker_bridge.federation_key``): grants and sealed manifests, each refusal by name."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from broker_bridge import envelope
from broker_bridge.errors import WireError
from broker_bridge.federation_key import (
    Keyring,
    new_content_key,
    open_grant,
    open_manifest,
    open_notice,
    seal_grant,
    seal_manifest,
    seal_notice,
    sealed_manifest_header,
)
from broker_bridge.keys import KeyPair

AGG = KeyPair.generate("aggregator", "aggregator")
A = KeyPair.generate("site", "site-a")
B = KeyPair.generate("site", "site-b")
AGG_PUB = bytes(AGG.signing_key.verify_key)
MANIFEST = {
    "federation": "plant",
    "version": 7,
    "epoch": 2,
    "created_at": 1.0,
    "spec": {"kind": "mlp"},
    "weights": {"hash": "ab" * 32, "size": 10, "chunks": 1},
    "onnx": {"hash": "cd" * 32, "size": 20, "chunks": 1},
}


def reason(fn, *args) -> str:
    with pytest.raises(WireError) as exc:
        fn(*args)
    return exc.value.reason


def test_a_grant_opens_only_for_its_site_and_only_if_the_aggregator_signed_it() -> None:
    key = new_content_key()
    grant = seal_grant("plant", A.public(), 2, key, AGG)
    assert open_grant(grant, A, AGG_PUB, "plant") == (2, key)
    assert reason(open_grant, grant, B, AGG_PUB, "plant") == "decrypt"  # sealed to A's X25519 key
    forged = seal_grant("plant", A.public(), 2, new_content_key(), KeyPair.generate("aggregator", "aggregator"))
    assert reason(open_grant, forged, A, AGG_PUB, "plant") == "signature"  # anyone may seal to A: not sign
    assert reason(open_grant, grant, A, AGG_PUB, "other") == "schema"
    for_b = seal_grant("plant", A.public(), 2, key, AGG)[:3] + b"\x09" + grant[4:]
    assert reason(open_grant, for_b, A, AGG_PUB, "plant") == "version"
    assert reason(open_grant, b"FLG\x01" + bytes(10), A, AGG_PUB, "plant") == "framing"


def test_sealed_manifest_shows_epoch_and_version_only() -> None:
    key = new_content_key()
    signed = envelope.sign_manifest(MANIFEST, AGG)
    sealed = seal_manifest(signed, 7, 2, key)
    assert sealed_manifest_header(sealed) == (2, 7)
    for word in (b"plant", b"mlp", b"ab" * 4, b"weights", b"version"):
        assert word not in sealed
    doc, inner = open_manifest(sealed, Keyring({2: key}), AGG_PUB)
    assert doc == MANIFEST and inner == signed
    assert reason(open_manifest, sealed, Keyring({1: key}), AGG_PUB) == "epoch"  # no key of epoch 2
    assert reason(open_manifest, sealed, Keyring({2: new_content_key()}), AGG_PUB) == "decrypt"
    # a member (holds the key) relabels the clear version number: the signed one inside disagrees
    relabelled = seal_manifest(signed, 9, 2, key)
    assert reason(open_manifest, relabelled, Keyring({2: key}), AGG_PUB) == "schema"
    # a member forges a whole manifest: it opens, but the signature is not the aggregator's
    forged = seal_manifest(envelope.sign_manifest(MANIFEST, A), 7, 2, key)
    assert reason(open_manifest, forged, Keyring({2: key}), AGG_PUB) == "signature"


def test_a_members_notice_shows_its_epoch_only_and_opens_for_holders_of_that_key() -> None:
    """Secure aggregation's announcements name members, weights and survivors: members only."""
    key = new_content_key()
    signed = envelope.sign_body(b"FLA", b"test-domain\x00", b'{"members":["site-a","site-b"]}', AGG)
    sealed = seal_notice(signed, 3, key)
    assert sealed[:4] == b"FLN\x01" and int.from_bytes(sealed[4:8], "little") == 3
    assert b"site-a" not in sealed and b"members" not in sealed
    assert open_notice(sealed, Keyring({3: key}), "cohort announcement") == signed
    assert reason(open_notice, sealed, Keyring({2: key}), "cohort") == "epoch"  # not granted (yet), or revoked
    assert reason(open_notice, sealed, Keyring({3: new_content_key()}), "cohort") == "decrypt"
    assert reason(open_notice, sealed[:3] + b"\x09" + sealed[4:], Keyring({3: key}), "cohort") == "version"
    assert reason(open_notice, b"FLX" + sealed[3:], Keyring({3: key}), "cohort") == "framing"
    assert reason(open_notice, sealed[:20], Keyring({3: key}), "cohort") == "framing"
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    assert reason(open_notice, tampered, Keyring({3: key}), "cohort") == "decrypt"


def test_sealed_blobs_look_random() -> None:
    """Byte entropy of a sealed model blob is that of random bytes (what the capture test checks)."""
    blob = envelope.encode_tensors({"w": __import__("numpy").zeros(4096, "float32")})  # all zeros: entropy 0
    sealed = envelope.seal_for_federation(blob, new_content_key())
    counts = Counter(sealed)
    entropy = -sum(c / len(sealed) * math.log2(c / len(sealed)) for c in counts.values())
    assert entropy > 7.9
