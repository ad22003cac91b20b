"""An intake worker's opened update on its way to the reducer: signed by the worker, sealed to the reducer.

Why the reducer does not reopen the site's envelope: opening (decrypt, SHA-256,
Ed25519, parse, validate) is the intake's work that grows with the sites; the
workers exist to do it elsewhere. What the reducer gets is the worker's result,
refusals included (the reducer owns the verdict store, so a refused update's
receipt and its place in the replay rules are decided there too)::

    plain = FLF | ver | u32 len | canonical JSON doc | FLT1 tensors (accepted updates only)
    doc   = {"worker", "topic_site", "msg_id", "header" (the site's, or null), "norm", "reason", "detail"}
    inner = u8 len | worker id | Ed25519 signature | plain
    wire  = FLW | ver | SealedBox(reducer X25519 key, inner)
    signature = Ed25519(SHA-256("fedline-forward-v1\\0" || worker id || 0 || plain))

Sealed because the plaintext is a site's DP-noised delta and its header (the
same secrets the site sealed to the aggregator); signed because anyone can seal
to a public key: only a worker enrolled in ``[intake]`` (its public key file)
can make the reducer take a delta. The broker ACL adds a second fence: only the
worker users may publish on ``intake/<worker>/...`` and only the aggregator may
read it. The reducer stores the forward as it came (``FLW``) for a buffered
update and reads it back with :func:`open_forward` after a restart.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import PublicKey, SealedBox
from nacl.signing import VerifyKey

from aggregator.opener import Opened
from broker_bridge import envelope
from broker_bridge.envelope import UpdateHeader
from broker_bridge.errors import WireError
from broker_bridge.keys import KeyPair, PublicKeys
from broker_bridge.sealopen import seal_open

_WIRE_MAGIC = b"FLW"
_PLAIN_MAGIC = b"FLF"
_DOMAIN = b"fedline-forward-v1\x00"
_U32 = struct.Struct("<I")
VERSION = 1


def is_forward(blob: bytes | memoryview) -> bool:
    return bytes(memoryview(blob)[:3]) == _WIRE_MAGIC


def seal_forward(op: Opened, worker: KeyPair, reducer_box_pub: bytes) -> bytes:
    """The worker's result for one update, signed with the worker's key and sealed to the reducer's."""
    doc: dict[str, Any] = {
        "worker": worker.ident,
        "topic_site": op.topic_site,
        "msg_id": op.msg_id,
        "header": op.header.to_dict() if op.header is not None else None,
        "norm": None if math.isnan(op.norm) else float(op.norm),
        "reason": op.reason,
        "detail": op.detail,
    }
    head = envelope.canonical_json(doc)
    tensors = envelope.encode_tensors(op.tensors) if op.reason is None and op.tensors is not None else b""
    plain = b"".join([_PLAIN_MAGIC, bytes([VERSION]), _U32.pack(len(head)), head, tensors])
    ident = worker.ident.encode()
    sig = worker.signing_key.sign(envelope.digest(ident, _DOMAIN, b"\x00", plain)).signature
    inner = b"".join([bytes([len(ident)]), ident, sig, plain])
    return _WIRE_MAGIC + bytes([VERSION]) + SealedBox(PublicKey(reducer_box_pub)).encrypt(inner)


def open_forward(
    blob: bytes, reducer: KeyPair, workers: dict[str, PublicKeys], from_worker: str | None = None
) -> Opened:
    """Open and verify a forward; :class:`WireError` naming what is wrong (framing, decrypt, signature, worker, schema).

    ``from_worker``: the worker id the topic names; a forward signed by another worker is refused.
    """
    view = memoryview(blob)
    if len(view) < 4 + 48 or bytes(view[:3]) != _WIRE_MAGIC:
        raise WireError("framing", "not a forward from an intake worker (no FLW magic)")
    if view[3] != VERSION:
        raise WireError("version", f"forward format {view[3]}, this build reads {VERSION}")
    try:
        inner = seal_open(view[4:], reducer.box_key)
    except CryptoError:
        raise WireError("decrypt", "forward does not open with this aggregator's key") from None
    if len(inner) < 1 or len(inner) < 1 + inner[0] + 64 + 8:
        raise WireError("signature", "forward signature block is truncated")
    n = inner[0]
    ident = bytes(inner[1 : 1 + n]).decode("utf-8", errors="replace")
    sig, plain = bytes(inner[1 + n : 65 + n]), inner[65 + n :]
    pub = workers.get(ident)
    if pub is None:
        raise WireError("unenrolled", f"forward from {ident!r}, which is not one of this aggregator's intake workers")
    if from_worker is not None and ident != from_worker:
        raise WireError("schema", f"forward signed by {ident!r} but sent on {from_worker!r}'s topic")
    try:
        VerifyKey(pub.sign_pub).verify(envelope.digest(bytes(inner[1 : 1 + n]), _DOMAIN, b"\x00", plain), sig)
    except (BadSignatureError, ValueError, TypeError):
        raise WireError("signature", f"forward signature does not verify with worker {ident!r}'s key") from None
    if bytes(plain[:3]) != _PLAIN_MAGIC or plain[3] != VERSION:
        raise WireError("schema", "forward plaintext has no FLF magic of this version")
    (hlen,) = _U32.unpack_from(plain, 4)
    if 8 + hlen > len(plain):
        raise WireError("schema", f"forward header length {hlen} does not fit")
    try:
        doc = json.loads(bytes(plain[8 : 8 + hlen]))
    except (ValueError, RecursionError):
        raise WireError("schema", "forward header is not JSON") from None
    if not isinstance(doc, dict):
        raise WireError("schema", "forward header is not a JSON object")
    if doc.get("worker") != ident:
        raise WireError("schema", f"forward header names worker {doc.get('worker')!r}, signer is {ident!r}")
    header = UpdateHeader.from_dict(doc["header"]) if doc.get("header") is not None else None
    rest = plain[8 + hlen :]
    op = Opened(
        blob if isinstance(blob, bytes) else bytes(blob),
        header=header,
        tensors=envelope.decode_tensors(rest, "schema") if len(rest) else None,
        norm=math.nan if doc.get("norm") is None else float(doc["norm"]),
        reason=doc.get("reason"),
        detail=doc.get("detail"),
        topic_site=doc.get("topic_site"),
        msg_id=doc.get("msg_id"),
    )
    if op.reason is None and (op.header is None or op.tensors is None):
        raise WireError("schema", "an accepted forward carries the site's header and tensors")
    return op
