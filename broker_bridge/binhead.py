"""Binary forms of an update header (``FLU`` version 2) and of a receipt (``FLR`` version 2) (issue 19).

The JSON header of a DP update is about 340 bytes, of which the privacy figures
about 200; the same fields in binary are about 120::

    u16 length of what follows (the header block, up to the tensors)
    u64 counter | u32 base_version | u32 n_samples | f64 created_at | u8 encoding (0 float32, 1 int8)
    u8 len | msg_id (ASCII)
    u8 n | n privacy entries: u8 key | u8 tag | value

A key is an index into :data:`KEYS`, or 255 then ``u8 len | UTF-8 name``; a
tag is 0 null, 1 f64, 2 i64, 3 ``u8 len | UTF-8`` string, 4 an index into
:data:`STRINGS`, 5 an unsigned LEB128 integer (at most 10 bytes, below 2^64;
the encoder's form of every integer >= 0). Both lists are part of the wire
contract: append only.

A receipt's body (:func:`pack_receipt`) is ``u8 n | n entries`` of the same
kind, its keys from :data:`RECEIPT_KEYS` and its strings from
:data:`RECEIPT_STRINGS` (the verdicts and the common reasons): about 60 bytes
where the JSON took about 140, still signed and sealed to its site.

The site is not in the block: it is the signer's, which the signature's digest
binds (``envelope.seal_update``). The decoder is strict: every length checked
before use, the block must end exactly where it says, no duplicate key, no
NaN or infinity (JSON cannot carry them either), at most :data:`MAX_ENTRIES`
entries; anything else is ``WireError("schema")`` naming the fault. A header
the format cannot hold (a bool, an integer beyond 64 bits, a string of more than
255 bytes) is sent as JSON (version 1): :func:`pack` returns None.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any

from broker_bridge.errors import WireError

KEYS = (
    "mode",
    "accountant",
    "accounting",
    "clip_norm",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "epsilon",
    "delta",
    "unit_group",
)
STRINGS = ("dp-sgd", "off", "per_record", "rdp", "prv")
RECEIPT_KEYS = ("site", "counter", "msg_id", "verdict", "reason", "version", "detail", "staleness", "weight")
RECEIPT_STRINGS = ("applied", "buffered", "stale", "rejected", "superseded", "staleness", "replay", "schema")
ENCODINGS = ("float32", "int8")
MAX_ENTRIES = 64
_NAMED = 255
_FIXED = struct.Struct("<QIIdB")
_LEN = struct.Struct("<H")
_F64 = struct.Struct("<d")
_I64 = struct.Struct("<q")


# --------------------------------------------------------------------------- encoding
def _text(s: str) -> bytes | None:
    raw = s.encode("utf-8")
    return bytes([len(raw)]) + raw if len(raw) <= 255 else None


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _value(v: Any, strings: tuple[str, ...]) -> bytes | None:
    if v is None:
        return b"\x00"
    if isinstance(v, bool):
        return None  # JSON would say true/false: not a figure this format holds
    if isinstance(v, float):
        return b"\x01" + _F64.pack(v) if math.isfinite(v) else None
    if isinstance(v, int):
        if 0 <= v < 2**64:
            return b"\x05" + _varint(v)
        return b"\x02" + _I64.pack(v) if -(2**63) <= v < 0 else None
    if isinstance(v, str):
        if v in strings:
            return bytes([4, strings.index(v)])
        t = _text(v)
        return b"\x03" + t if t is not None else None
    return None


def pack_map(doc: Mapping[str, Any], keys: tuple[str, ...], strings: tuple[str, ...]) -> bytes | None:
    """``u8 n | n (key, tagged value)`` of a flat dict, or None when the format cannot hold it."""
    if len(doc) > MAX_ENTRIES:
        return None
    parts = [bytes([len(doc)])]
    for k, v in doc.items():
        if k in keys:
            key: bytes | None = bytes([keys.index(k)])
        else:
            name = _text(k)
            key = bytes([_NAMED]) + name if name is not None else None
        val = _value(v, strings)
        if key is None or val is None:
            return None
        parts += [key, val]
    return b"".join(parts)


def pack(doc: Mapping[str, Any]) -> bytes | None:
    """The binary block of an update header's dict (``UpdateHeader.to_dict``), or None if it cannot hold it."""
    enc = doc.get("encoding", "float32")
    msg = _text(doc["msg_id"])
    privacy = pack_map(doc["privacy"], KEYS, STRINGS)
    if enc not in ENCODINGS or msg is None or privacy is None or doc.get("format", 1) != 1:
        return None
    if not all(0 <= doc[k] < 2**bits for k, bits in (("counter", 64), ("base_version", 32), ("n_samples", 32))):
        return None
    created = doc["created_at"]
    if not isinstance(created, (int, float)) or not math.isfinite(created):
        return None
    enc_id = ENCODINGS.index(enc)
    block = _FIXED.pack(doc["counter"], doc["base_version"], doc["n_samples"], float(created), enc_id) + msg + privacy
    return _LEN.pack(len(block)) + block if len(block) < 2**16 else None


def pack_receipt(doc: Mapping[str, Any]) -> bytes | None:
    """A receipt's fields in binary (the body FLR version 2 signs), or None when the format cannot hold them."""
    return pack_map(doc, RECEIPT_KEYS, RECEIPT_STRINGS)


# --------------------------------------------------------------------------- decoding
class _Reader:
    """Bounds-checked reads from a block; every overrun is ``WireError("schema")`` naming the block."""

    def __init__(self, view: memoryview, what: str) -> None:
        self.view, self.pos, self.what = view, 0, what

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.view):
            raise WireError("schema", f"{self.what} is truncated in {what}")
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out

    def byte(self, what: str) -> int:
        return int(self.take(1, what)[0])

    def text(self, what: str) -> str:
        raw = bytes(self.take(self.byte(what), what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise WireError("schema", f"{self.what}: {what} is not UTF-8") from None

    def varint(self, what: str) -> int:
        v = 0
        for i in range(10):
            b = self.byte(what)
            v |= (b & 0x7F) << (7 * i)
            if not b & 0x80:
                if v < 2**64:
                    return v
                break
        raise WireError("schema", f"{self.what}: {what} is not an integer below 2^64")


def _read_value(r: _Reader, key: str, strings: tuple[str, ...]) -> Any:
    what = f"field {key!r}"
    tag = r.byte(what)
    if tag == 0:
        return None
    if tag == 1:
        (v,) = _F64.unpack(r.take(8, what))
        if not math.isfinite(v):
            raise WireError("schema", f"{r.what}: {what} is not finite")
        return v
    if tag == 2:
        return _I64.unpack(r.take(8, what))[0]
    if tag == 3:
        return r.text(what)
    if tag == 4:
        i = r.byte(what)
        if i >= len(strings):
            raise WireError("schema", f"{r.what}: {what} names string {i} of {len(strings)}")
        return strings[i]
    if tag == 5:
        return r.varint(what)
    raise WireError("schema", f"{r.what}: {what} has unknown tag {tag}")


def _read_map(r: _Reader, keys: tuple[str, ...], strings: tuple[str, ...]) -> dict[str, Any]:
    count = r.byte("the field count")
    if count > MAX_ENTRIES:
        raise WireError("schema", f"{r.what}: {count} fields, at most {MAX_ENTRIES}")
    out: dict[str, Any] = {}
    for _ in range(count):
        k = r.byte("a key")
        if k == _NAMED:
            key = r.text("a key")
        elif k < len(keys):
            key = keys[k]
        else:
            raise WireError("schema", f"{r.what}: key {k} is not one of {len(keys)}")
        if key in out:
            raise WireError("schema", f"{r.what}: field {key!r} twice")
        out[key] = _read_value(r, key, strings)
    return out


def unpack(view: memoryview, site: str) -> tuple[dict[str, Any], int]:
    """The header dict (as ``UpdateHeader.from_dict`` takes it; the site from the signer) and the bytes the
    block took, length included."""
    if len(view) < 2:
        raise WireError("schema", "binary update header is truncated in its length")
    (n,) = _LEN.unpack_from(view, 0)
    if 2 + n > len(view):
        raise WireError("schema", f"binary update header length {n} does not fit")
    r = _Reader(view[2 : 2 + n], "binary update header")
    counter, base, samples, created, enc = _FIXED.unpack(r.take(_FIXED.size, "its fixed fields"))
    if enc >= len(ENCODINGS) or not math.isfinite(created):
        raise WireError("schema", f"binary update header: encoding {enc} or created_at {created} is not valid")
    msg_id = r.text("msg_id")
    privacy = _read_map(r, KEYS, STRINGS)
    if r.pos != n:
        raise WireError("schema", f"binary update header: {n - r.pos} bytes after its last field")
    doc: dict[str, Any] = {
        "site": site,
        "counter": counter,
        "msg_id": msg_id,
        "base_version": base,
        "n_samples": samples,
        "privacy": privacy,
        "created_at": created,
        "format": 1,
    }
    if enc:
        doc["encoding"] = ENCODINGS[enc]
    return doc, 2 + n


def unpack_receipt(view: memoryview) -> dict[str, Any]:
    """Inverse of :func:`pack_receipt`; the body must end with its last field."""
    r = _Reader(view, "binary receipt")
    doc = _read_map(r, RECEIPT_KEYS, RECEIPT_STRINGS)
    if r.pos != len(view):
        raise WireError("schema", f"binary receipt: {len(view) - r.pos} bytes after its last field")
    return doc
