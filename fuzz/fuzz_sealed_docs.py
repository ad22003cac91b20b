"""Fuzz the members-only formats (issue 13): key grants, sealed manifests, sealed receipts, line commands.

First byte picks the decoder (``% 4``) and, in its next bit, how far in the
fuzzer starts, so it reaches every check and not only the first one (random
ciphertext never decrypts):

- grants (``federation_key.open_grant``): raw bytes as on ``sites/<site>/fedkey``,
  or a body signed by the aggregator and sealed to the site (JSON and schema);
- sealed manifests (``federation_key.open_manifest``): raw bytes, or a body
  encrypted under the content key that members hold (a member forging a
  manifest must still fail on the aggregator's signature);
- sealed receipts (``envelope.open_receipt``): raw bytes, or a body sealed to
  the site (must fail on the signature);
- line commands (``line_command.CommandVerifier``): raw bytes, or a body
  signed by the site (JSON, schema and freshness).
"""

from __future__ import annotations

from _harness import AGGREGATOR, FEDERATION, OUTSIDER, SITE_A, instrumented, main
from nacl.public import PublicKey, SealedBox

with instrumented():
    from broker_bridge import envelope, federation_key, line_command

AGG_PUB = bytes(AGGREGATOR.signing_key.verify_key)
KEY = bytes(range(32))
KEYRING = federation_key.Keyring({1: KEY})
_TO_SITE = SealedBox(PublicKey(bytes(SITE_A.box_key.public_key)))
VERIFIER = line_command.CommandVerifier(
    {"site": bytes(SITE_A.signing_key.verify_key), "aggregator": AGG_PUB},
    FEDERATION,
    "site-a",
    max_age_s=1e12,
    max_skew_s=1e12,
)


def target(data: bytes) -> None:
    if len(data) < 1:
        return
    kind, deep, body = data[0] % 4, bool(data[0] & 4), data[1:]
    if kind == 0:
        if deep:
            inner = envelope.sign_body(federation_key._GRANT_BODY_MAGIC, federation_key._GRANT_DOMAIN, body, AGGREGATOR)
            body = federation_key.GRANT_MAGIC + bytes([envelope.FORMAT_VERSION]) + _TO_SITE.encrypt(inner)
        epoch, key = federation_key.open_grant(body, SITE_A, AGG_PUB, FEDERATION)
        assert epoch >= 1 and len(key) == 32
    elif kind == 1:
        if deep:  # a member (holds the key) encrypts a body signed by someone who is not the aggregator
            signed = envelope.sign_body(envelope._MANIFEST_MAGIC, envelope._MANIFEST_DOMAIN, body, OUTSIDER)
            body = federation_key.seal_manifest(signed, 3, 1, KEY)
        doc, _ = federation_key.open_manifest(body, KEYRING, AGG_PUB)
        assert not deep, "a manifest signed by another key opened"
        assert isinstance(doc["version"], int)
    elif kind == 2:
        if deep:
            body = b"FLQ" + bytes([envelope.FORMAT_VERSION]) + _TO_SITE.encrypt(body)
        doc = envelope.open_receipt(body, SITE_A, AGG_PUB)
        assert doc["site"] == "site-a"
    else:
        if deep:
            body = envelope.sign_body(line_command._MAGIC, line_command._DOMAIN, body, SITE_A)
        signer, doc = VERIFIER.verify(body)
        assert signer in ("site", "aggregator") and doc["command"] in line_command.COMMANDS


def seeds() -> list[bytes]:
    grant = federation_key.seal_grant(FEDERATION, SITE_A.public(), 1, KEY, AGGREGATOR)
    grant_body = envelope.canonical_json(
        {"federation": FEDERATION, "site": "site-a", "epoch": 1, "key": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}
    )
    manifest = {
        "federation": FEDERATION,
        "version": 3,
        "epoch": 1,
        "created_at": 1.0e9,
        "spec": {},
        "weights": {"hash": "ab" * 32, "size": 1, "chunks": 1},
        "onnx": {"hash": "cd" * 32, "size": 1, "chunks": 1},
    }
    sealed_manifest = federation_key.seal_manifest(envelope.sign_manifest(manifest, AGGREGATOR), 3, 1, KEY)
    receipt = {"site": "site-a", "counter": 1, "msg_id": "00ff", "verdict": "applied", "reason": None, "version": 2}
    command = line_command.sign_command("rollback", FEDERATION, "site-a", SITE_A)
    return [
        b"\x00" + grant,
        b"\x04" + grant_body,
        b"\x01" + sealed_manifest,
        b"\x05" + envelope.canonical_json(manifest),
        b"\x02" + envelope.seal_receipt(receipt, AGGREGATOR, bytes(SITE_A.box_key.public_key)),
        b"\x06" + envelope.sign_receipt(receipt, AGGREGATOR),
        b"\x03" + command,
        b"\x07" + command[68:],
    ]


if __name__ == "__main__":
    main(target, seeds())
