"""Models for members only: the federation content key, its grants, and sealed manifests.

Why: a global model is the sum of a few sites' deltas, so whoever reads two
consecutive versions learns a mix of plant data. The aggregator therefore
encrypts every weight blob, ONNX blob and manifest under a *content key*
(NaCl SecretBox, XSalsa20-Poly1305) that only enrolled sites hold.

- **Epochs.** The key belongs to a key epoch (1, 2, ...). Revoking a site starts
  a new epoch with a fresh key that the revoked site never receives, so it
  cannot read anything published afterwards. Enrolling a site keeps the epoch.
- **Grants** (``FLG``): the key of the current epoch, signed by the aggregator
  and sealed to one site's X25519 key, published retained on
  ``sites/<site>/fedkey`` (only that site and the aggregator may read it)::

      wire  = FLG | ver | SealedBox(site X25519 key, FLK | ver | signature | JSON)
      JSON  = {"federation", "site", "epoch", "key": base64 32 bytes}

  Signed because anyone may seal to a site's public key: without the signature
  a stranger could hand a site a key of his own and feed it models.
- **Sealed manifests** (``FLX``): the aggregator's signed manifest, encrypted::

      wire  = FLX | ver | u32 epoch | u32 version | SecretBox(key, FLM signed manifest)

  The broker and outsiders see the epoch and the version number, nothing
  else. The version inside the signed manifest must equal the clear one, so a
  member holding the key (SecretBox is symmetric) cannot relabel a version.
- **Members' notices** (``FLN``): any other signed document only members may read
  (secure aggregation's cohort and survivors announcements)::

      wire  = FLN | ver | u32 epoch | SecretBox(key, signed document)

  The broker and outsiders see the epoch, nothing else; the signature inside is
  the aggregator's, so a member holding the key cannot forge one either.
- **Model blobs** (weights, ONNX) are ``SecretBox(key, blob)`` before chunking
  (:func:`broker_bridge.envelope.seal_for_federation`); the manifest's hash and
  size are those of the plaintext, checked after decryption.

Edges and lines keep the keys they were granted in a :class:`Keyring`.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Mapping
from typing import Any

import nacl.utils
from nacl.exceptions import CryptoError
from nacl.public import PublicKey, SealedBox
from nacl.secret import SecretBox

from broker_bridge.envelope import FORMAT_VERSION, canonical_json, sign_body, verify_body, verify_manifest
from broker_bridge.errors import WireError
from broker_bridge.keys import KeyPair, PublicKeys

GRANT_MAGIC = b"FLG"
SEALED_MANIFEST_MAGIC = b"FLX"
NOTICE_MAGIC = b"FLN"
_GRANT_BODY_MAGIC = b"FLK"
_GRANT_DOMAIN = b"fedline-grant-v1\x00"
_EPOCH_VERSION = struct.Struct("<II")
_EPOCH = struct.Struct("<I")
GRANT_FIELDS = ("federation", "site", "epoch", "key")
MAX_GRANT_BYTES = 4096


def new_content_key() -> bytes:
    """A fresh 32-byte SecretBox key from the OS CSPRNG."""
    return nacl.utils.random(SecretBox.KEY_SIZE)


# --------------------------------------------------------------------------- grants
def seal_grant(federation: str, site: PublicKeys, epoch: int, key: bytes, aggregator_keys: KeyPair) -> bytes:
    """The content key of ``epoch`` for one site: signed by the aggregator, sealed to the site."""
    if len(key) != SecretBox.KEY_SIZE or epoch < 1:
        raise ValueError("a grant needs a 32-byte key and an epoch >= 1")
    doc = {
        "federation": federation,
        "site": site.ident,
        "epoch": int(epoch),
        "key": base64.b64encode(key).decode("ascii"),
    }
    inner = sign_body(_GRANT_BODY_MAGIC, _GRANT_DOMAIN, canonical_json(doc), aggregator_keys)
    return GRANT_MAGIC + bytes([FORMAT_VERSION]) + SealedBox(PublicKey(site.box_pub)).encrypt(inner)


def open_grant(
    blob: bytes | memoryview, site_keys: KeyPair, aggregator_sign_pub: bytes, federation: str
) -> tuple[int, bytes]:
    """``(epoch, key)`` from a grant sealed to this site, or :class:`WireError` naming what is wrong."""
    view = memoryview(blob)
    if len(view) < 4 + 48 or len(view) > MAX_GRANT_BYTES:
        raise WireError("framing", f"{len(view)} bytes is not the size of a key grant")
    if bytes(view[:3]) != GRANT_MAGIC:
        raise WireError("framing", "not a key grant (no FLG magic)")
    if view[3] != FORMAT_VERSION:
        raise WireError("version", f"key grant format {view[3]}, this build reads {FORMAT_VERSION}")
    try:
        inner = SealedBox(site_keys.box_key).decrypt(bytes(view[4:]))
    except CryptoError:
        raise WireError("decrypt", f"key grant is not sealed to site {site_keys.ident!r}") from None
    doc = verify_body(_GRANT_BODY_MAGIC, _GRANT_DOMAIN, "key grant", inner, aggregator_sign_pub, GRANT_FIELDS)
    if doc["site"] != site_keys.ident or doc["federation"] != federation:
        raise WireError(
            "schema",
            f"key grant is for site {doc['site']!r} of {doc['federation']!r}, "
            f"not {site_keys.ident!r} of {federation!r}",
        )
    epoch = doc["epoch"]
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 1 <= epoch < 2**32:
        raise WireError("schema", f"key grant epoch {epoch!r} is not an integer >= 1")
    try:
        key = base64.b64decode(doc["key"], validate=True) if isinstance(doc["key"], str) else b""
    except ValueError:
        key = b""
    if len(key) != SecretBox.KEY_SIZE:
        raise WireError("schema", "key grant key is not 32 bytes of base64")
    return epoch, key


# --------------------------------------------------------------------------- manifests
def seal_manifest(signed_manifest: bytes, version: int, epoch: int, key: bytes) -> bytes:
    """Encrypt a signed manifest (``envelope.sign_manifest``) under the content key of ``epoch``."""
    return (
        SEALED_MANIFEST_MAGIC
        + bytes([FORMAT_VERSION])
        + _EPOCH_VERSION.pack(epoch, version)
        + SecretBox(key).encrypt(signed_manifest)
    )


def sealed_manifest_header(blob: bytes | memoryview) -> tuple[int, int]:
    """``(epoch, version)``: the two numbers anyone may read off a sealed manifest."""
    view = memoryview(blob)
    if len(view) < 4 + _EPOCH_VERSION.size + SecretBox.NONCE_SIZE + SecretBox.MACBYTES:
        raise WireError("framing", f"{len(view)} bytes is too short for a sealed manifest")
    if bytes(view[:3]) != SEALED_MANIFEST_MAGIC:
        raise WireError("framing", "not a sealed manifest (no FLX magic)")
    if view[3] != FORMAT_VERSION:
        raise WireError("version", f"sealed manifest format {view[3]}, this build reads {FORMAT_VERSION}")
    return _EPOCH_VERSION.unpack_from(view, 4)


def open_manifest(
    blob: bytes | memoryview, keyring: Mapping[int, bytes], aggregator_sign_pub: bytes
) -> tuple[dict[str, Any], bytes]:
    """Decrypt and verify a sealed manifest: ``(manifest dict, the signed manifest bytes inside)``.

    Raises ``WireError("epoch")`` when no key of its epoch is held (not granted
    yet, or this site was revoked), ``decrypt`` when the key does not open it.
    """
    epoch, version = sealed_manifest_header(blob)
    key = keyring.get(epoch)
    if key is None:
        raise WireError("epoch", f"no content key for epoch {epoch} (version {version})")
    try:
        inner = SecretBox(key).decrypt(bytes(memoryview(blob)[4 + _EPOCH_VERSION.size :]))
    except CryptoError:
        raise WireError("decrypt", f"manifest of version {version} does not open with the epoch {epoch} key") from None
    doc = verify_manifest(inner, aggregator_sign_pub)
    if doc["version"] != version or doc.get("epoch") != epoch:
        raise WireError(
            "schema",
            f"sealed manifest says version {version} epoch {epoch}, the signed one "
            f"{doc['version']} epoch {doc.get('epoch')}",
        )
    return doc, inner


# --------------------------------------------------------------------------- members' notices
def seal_notice(signed: bytes, epoch: int, key: bytes) -> bytes:
    """Encrypt a signed document under the content key of ``epoch``: members read it, the broker does not."""
    return NOTICE_MAGIC + bytes([FORMAT_VERSION]) + _EPOCH.pack(epoch) + SecretBox(key).encrypt(signed)


def open_notice(blob: bytes | memoryview, keyring: Mapping[int, bytes], what: str) -> bytes:
    """The signed document inside a members' notice (its signature is the caller's to check).

    Raises ``WireError("epoch")`` when no key of its epoch is held (not granted yet: keep it and
    try again when the grant arrives; or revoked), ``decrypt`` when the key does not open it.
    """
    view = memoryview(blob)
    if len(view) < 4 + _EPOCH.size + SecretBox.NONCE_SIZE + SecretBox.MACBYTES:
        raise WireError("framing", f"{len(view)} bytes is too short for a sealed {what}")
    if bytes(view[:3]) != NOTICE_MAGIC:
        raise WireError("framing", f"{what} is not sealed for members (no FLN magic)")
    if view[3] != FORMAT_VERSION:
        raise WireError("version", f"sealed {what} format {view[3]}, this build reads {FORMAT_VERSION}")
    (epoch,) = _EPOCH.unpack_from(view, 4)
    key = keyring.get(epoch)
    if key is None:
        raise WireError("epoch", f"no content key for epoch {epoch} to open a {what}")
    try:
        return SecretBox(key).decrypt(bytes(view[4 + _EPOCH.size :]))
    except CryptoError:
        raise WireError("decrypt", f"{what} does not open with the epoch {epoch} key") from None


class Keyring(dict[int, bytes]):
    """Content keys by epoch, from the grants a site (or its line) received. ``dict`` semantics."""

    def add_grant(self, blob: bytes, site_keys: KeyPair, aggregator_sign_pub: bytes, federation: str) -> int:
        """Open a grant, keep its key, return its epoch (raises :class:`WireError`)."""
        epoch, key = open_grant(blob, site_keys, aggregator_sign_pub, federation)
        self[epoch] = key
        return epoch
