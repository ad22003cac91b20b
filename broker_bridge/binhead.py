"""An update header in fixed-width binary: what ``FLU`` version 2 carries instead of canonical JSON (issue 19).

The JSON header of a DP update is about 340 bytes, of which the privacy figures
about 200; the same fields in binary are about 120::

    u16 length of what follows (the header block, up to the tensors)
    u64 counter | u32 base_version | u32 n_samples | f64 created_at | u8 encoding (0 float32, 1 int8)
    u8 len | msg_id (ASCII)
    u8 n | n privacy entries: u8 key | u8 tag | value

A key is an index into :data:`KEYS`, or 255 then ``u8 len | UTF-8 name``; a
tag is 0 null, 1 f64, 2 i64, 3 ``u8 len | UTF-8`` string, 4 an index into
:data:`STRINGS`. Both lists are part of the wire contract: append only.

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
ENCODINGS = ("float32", "int8")
MAX_ENTRIES = 64
_NAMED = 255
_FIXED = struct.Struct("<QIIdB")
_LEN = struct.Struct("<H")
_F64 = struct.Struct("<d")
_I64 = struct.Struct("<q")
_KEY_ID = {k: i for i, k in enumerate(KEYS)}
_STRING_ID = {s: i for i, s in enumerate(STRINGS)}


def _text(s: str) -> bytes | None:
    raw = s.encode("utf-8")
    return bytes([len(raw)]) + raw if len(raw) <= 255 else None


def _value(v: Any) -> bytes | None:
    if v is None:
        return b"\x00"
    if isinstance(v, bool):
        return None  # JSON would say true/false: not a privacy figure this format holds
    if isinstance(v, float):
        return b"\x01" + _F64.pack(v) if math.isfinite(v) else None
    if isinstance(v, int):
        return b"\x02" + _I64.pack(v) if -(2**63) <= v < 2**63 else None
    if isinstance(v, str):
        if v in _STRING_ID:
            return bytes([4, _STRING_ID[v]])
        t = _text(v)
        return b"\x03" + t if t is not None else None
    return None


def pack(doc: Mapping[str, Any]) -> bytes | None:
    """The binary block of an update header's dict (``UpdateHeader.to_dict``), or None if it cannot hold it."""
    enc = doc.get("encoding", "float32")
    msg = _text(doc["msg_id"])
    privacy = doc["privacy"]
    if enc not in ENCODINGS or msg is None or len(privacy) > MAX_ENTRIES or doc.get("format", 1) != 1:
        return None
    if not all(0 <= doc[k] < 2**bits for k, bits in (("counter", 64), ("base_version", 32), ("n_samples", 32))):
        return None
    if not isinstance(doc["created_at"], (int, float)) or not math.isfinite(doc["created_at"]):
        return None
    parts = [
        _FIXED.pack(
            doc["counter"], doc["base_version"], doc["n_samples"], float(doc["created_at"]), ENCODINGS.index(enc)
        ),
        msg,
        bytes([len(privacy)]),
    ]
    for k, v in privacy.items():
        if k in _KEY_ID:
            key: bytes | None = bytes([_KEY_ID[k]])
        else:
            name = _text(k)
            key = bytes([_NAMED]) + name if name is not None else None
        val = _value(v)
        if key is None or val is None:
            return None
        parts += [key, val]
    block = b"".join(parts)
    return _LEN.pack(len(block)) + block if len(block) < 2**16 else None


class _Reader:
    """Bounds-checked reads from a header block; every overrun is ``WireError("schema")``."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.pos = view, 0

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.view):
            raise WireError("schema", f"binary update header is truncated in {what}")
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
            raise WireError("schema", f"binary update header: {what} is not UTF-8") from None


def _read_value(r: _Reader, key: str) -> Any:
    tag = r.byte(f"privacy field {key!r}")
    if tag == 0:
        return None
    if tag == 1:
        (v,) = _F64.unpack(r.take(8, f"privacy field {key!r}"))
        if not math.isfinite(v):
            raise WireError("schema", f"binary update header: privacy field {key!r} is not finite")
        return v
    if tag == 2:
        return _I64.unpack(r.take(8, f"privacy field {key!r}"))[0]
    if tag == 3:
        return r.text(f"privacy field {key!r}")
    if tag == 4:
        i = r.byte(f"privacy field {key!r}")
        if i >= len(STRINGS):
            raise WireError("schema", f"binary update header: privacy field {key!r} names string {i} of none")
        return STRINGS[i]
    raise WireError("schema", f"binary update header: privacy field {key!r} has unknown tag {tag}")


def unpack(view: memoryview, site: str) -> tuple[dict[str, Any], int]:
    """The header dict (as ``UpdateHeader.from_dict`` takes it; the site from the signer) and the bytes the
    block took, length included."""
    if len(view) < 2:
        raise WireError("schema", "binary update header is truncated in its length")
    (n,) = _LEN.unpack_from(view, 0)
    if 2 + n > len(view):
        raise WireError("schema", f"binary update header length {n} does not fit")
    r = _Reader(view[2 : 2 + n])
    counter, base, samples, created, enc = _FIXED.unpack(r.take(_FIXED.size, "its fixed fields"))
    if enc >= len(ENCODINGS) or not math.isfinite(created):
        raise WireError("schema", f"binary update header: encoding {enc} or created_at {created} is not valid")
    msg_id = r.text("msg_id")
    count = r.byte("the privacy count")
    if count > MAX_ENTRIES:
        raise WireError("schema", f"binary update header: {count} privacy fields, at most {MAX_ENTRIES}")
    privacy: dict[str, Any] = {}
    for _ in range(count):
        k = r.byte("a privacy key")
        if k == _NAMED:
            key = r.text("a privacy key")
        elif k < len(KEYS):
            key = KEYS[k]
        else:
            raise WireError("schema", f"binary update header: privacy key {k} is not one of {len(KEYS)}")
        if key in privacy:
            raise WireError("schema", f"binary update header: privacy field {key!r} twice")
        privacy[key] = _read_value(r, key)
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
