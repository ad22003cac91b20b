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

A site's status (:func:`pack_status`, ``FLH1``, issue 19) is ``FLH1 | map``, keys from :data:`STATUS_KEYS`
and strings from :data:`STATUS_STRINGS`, with the manifest's tags (``reads`` is a list, ``model_refused`` a
map): about 90 bytes where the JSON took about 250. Statuses are public (the broker operator and the
observer read them, unsigned, as before); the binary form says exactly what the JSON said.
:func:`read_status` is every reader's one way in: JSON (an older agent, a plant's uplink, every last will)
or FLH1.

A manifest's body (:func:`pack_manifest`, ``FLM`` version 3) is a map of the same kind with four more
tags (*extended*, also in statuses and compact receipts, FLR version 3): 6 a map (one level deep:
``weights``, ``onnx``, ``delta``, ``upstream``), 7 a list of strings (``reads``; at most :data:`MAX_LIST`),
8 a lowercase hex string as its raw bytes (``u8 len | bytes``: a blob's BLAKE2b-256 in 33 bytes where its hex
took 66), 9 false, 10 true. The update header's and the version 2 receipt's decoders refuse them (they never
carried them), so those two forms are byte for byte what they were.
"""

from __future__ import annotations

import json
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
#: a manifest's keys (``aggregator.publish.build_release``; the parts' ``msg_id`` is left out: it is always
#: ``v<version>-<part>``, :func:`unpack_manifest` puts it back) and strings (the formats ``reads`` names)
MANIFEST_KEYS = (
    "federation",
    "version",
    "epoch",
    "created_at",
    "spec_hash",
    "weights",
    "onnx",
    "delta",
    "reads",
    "steps",
    "metric",
    "upstream",
    "hash",
    "size",
    "chunks",
    "from",
)
MANIFEST_STRINGS = ("FLT2", "FLU2", "FLR2", "FLM2", "FLM3", "FLH1")
MANIFEST_PARTS = ("weights", "onnx", "delta")
#: a status's keys (``edge.status_doc.STATUS_FIELDS`` and a last will's ``reason``) and common strings
STATUS_KEYS = (
    "state",
    "version",
    "epoch",
    "privacy",
    "accounting",
    "epsilon",
    "epsilon_budget",
    "delta",
    "privacy_unit",
    "publishing",
    "outbox_depth",
    "model_refused",
    "reads",
    "ts",
    "reason",
)
STATUS_STRINGS = (
    "online",
    "offline",
    "on",
    "off",
    "per_record",
    "per_line",
    "row",
    "ok",
    "budget_exhausted",
    "outbox_full",
    "recovering",
    "step",
    "FLT2",
    "FLR2",
    "FLM2",
    "FLM3",
    "FLR3",
)
STATUS_MAGIC = b"FLH1"
MAX_STATUS_BYTES = 4096  # a status is about 90 bytes binary, 250 as JSON
ENCODINGS = ("float32", "int8")
MAX_ENTRIES = 64
MAX_LIST = 32  # strings in a list (a manifest's or a status's ``reads``: five today)
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


def _hex(s: str) -> bytes | None:
    """``s`` as raw bytes when it is lowercase hex of at most 255 bytes (it decodes back to the same string)."""
    if not 0 < len(s) <= 510 or len(s) % 2 or s.strip("0123456789abcdef"):
        return None
    return bytes.fromhex(s)


def _extended(v: Any, keys: tuple[str, ...], strings: tuple[str, ...], depth: int) -> bytes | None:
    """A manifest's value beyond the scalars (tags 6-10), or None when it is none of those or cannot be held."""
    if isinstance(v, bool):
        return b"\x0a" if v else b"\x09"
    if isinstance(v, str):
        raw = _hex(v)
        return b"\x08" + bytes([len(raw)]) + raw if raw is not None else None
    if isinstance(v, Mapping) and depth == 0:
        inner = pack_map(v, keys, strings, extended=True, depth=1)
        return b"\x06" + inner if inner is not None else None
    if isinstance(v, (list, tuple)) and len(v) <= MAX_LIST and all(isinstance(x, str) for x in v):
        items = [b for b in (_value(x, strings) for x in v) if b is not None]
        return b"\x07" + bytes([len(v)]) + b"".join(items) if len(items) == len(v) else None
    return None


def _value(
    v: Any, strings: tuple[str, ...], keys: tuple[str, ...] = (), extended: bool = False, depth: int = 0
) -> bytes | None:
    if v is None:
        return b"\x00"
    if extended and (isinstance(v, (bool, Mapping, list, tuple)) or (isinstance(v, str) and v not in strings)):
        held = _extended(v, keys, strings, depth)
        if held is not None or not isinstance(v, str):
            return held
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


def pack_map(
    doc: Mapping[str, Any], keys: tuple[str, ...], strings: tuple[str, ...], extended: bool = False, depth: int = 0
) -> bytes | None:
    """``u8 n | n (key, tagged value)`` of a flat dict (``extended``: a manifest's, with maps one level deep,
    lists of strings, hex as bytes and booleans), or None when the format cannot hold it."""
    if len(doc) > MAX_ENTRIES:
        return None
    parts = [bytes([len(doc)])]
    for k, v in doc.items():
        if k in keys:
            key: bytes | None = bytes([keys.index(k)])
        else:
            name = _text(k)
            key = bytes([_NAMED]) + name if name is not None else None
        val = _value(v, strings, keys, extended, depth)
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


def pack_receipt(doc: Mapping[str, Any], compact: bool = False) -> bytes | None:
    """A receipt's fields in binary (the body FLR version 2 signs), or None when the format cannot hold them.

    ``compact`` (FLR version 3, for a site whose status reads FLR3): the fields that are null left out (the
    decoder puts them back) and the manifest's tags, so the hex message id goes as its 8 raw bytes: about 35
    bytes where version 2 took 50."""
    if compact:
        return pack_map({k: v for k, v in doc.items() if v is not None}, RECEIPT_KEYS, RECEIPT_STRINGS, extended=True)
    return pack_map(doc, RECEIPT_KEYS, RECEIPT_STRINGS)


def pack_manifest(doc: Mapping[str, Any]) -> bytes | None:
    """A manifest's fields in binary (the body FLM version 3 signs), or None when the format cannot hold them.

    Each part's ``msg_id`` must be ``v<version>-<part>`` (what ``aggregator.publish`` names it) and is left
    out; a manifest with the whole spec (not ``spec_hash``) goes as JSON: it holds lists of floats."""
    version = doc.get("version")
    slim = dict(doc)
    for part in MANIFEST_PARTS:
        entry = doc.get(part)
        if not isinstance(entry, Mapping) or entry.get("msg_id") != f"v{version}-{part}":
            if part in doc:
                return None
            continue
        slim[part] = {k: v for k, v in entry.items() if k != "msg_id"}
    return pack_map(slim, MANIFEST_KEYS, MANIFEST_STRINGS, extended=True)


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


def _read_extended(r: _Reader, tag: int, key: str, keys: tuple[str, ...], strings: tuple[str, ...], depth: int) -> Any:
    """Tags 6-10, a manifest's only: a map one level deep, a list of strings, hex as bytes, false, true."""
    what = f"field {key!r}"
    if tag == 6:
        if depth:
            raise WireError("schema", f"{r.what}: {what} is a map inside a map")
        return _read_map(r, keys, strings, extended=True, depth=1)
    if tag == 7:
        n = r.byte(what)
        if n > MAX_LIST:
            raise WireError("schema", f"{r.what}: {what} lists {n} strings, at most {MAX_LIST}")
        items = [_read_value(r, f"{key}[{i}]", strings) for i in range(n)]
        if not all(isinstance(x, str) for x in items):
            raise WireError("schema", f"{r.what}: {what} holds a value that is not a string")
        return items
    if tag == 8:
        raw = bytes(r.take(r.byte(what), what))
        if not raw:
            raise WireError("schema", f"{r.what}: {what} is empty hex")
        return raw.hex()
    return tag == 10


def _read_value(
    r: _Reader, key: str, strings: tuple[str, ...], keys: tuple[str, ...] = (), extended: bool = False, depth: int = 0
) -> Any:
    what = f"field {key!r}"
    tag = r.byte(what)
    if extended and 6 <= tag <= 10:
        return _read_extended(r, tag, key, keys, strings, depth)
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


def _read_map(
    r: _Reader, keys: tuple[str, ...], strings: tuple[str, ...], extended: bool = False, depth: int = 0
) -> dict[str, Any]:
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
        out[key] = _read_value(r, key, strings, keys, extended, depth)
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


def unpack_receipt(view: memoryview, compact: bool = False) -> dict[str, Any]:
    """Inverse of :func:`pack_receipt`; the body must end with its last field. ``compact``: a version 3 body,
    each of :data:`RECEIPT_KEYS` it leaves out read as null."""
    r = _Reader(view, "binary receipt")
    doc = _read_map(r, RECEIPT_KEYS, RECEIPT_STRINGS, extended=compact)
    if r.pos != len(view):
        raise WireError("schema", f"binary receipt: {len(view) - r.pos} bytes after its last field")
    if compact:
        if any(isinstance(v, (dict, list, bool)) for v in doc.values()):
            raise WireError("schema", "binary receipt: a map, a list or a boolean is no receipt field")
        missing = [k for k in ("site", "counter", "msg_id", "verdict") if k not in doc]
        if missing:
            raise WireError("schema", f"receipt lacks {', '.join(missing)}")
        doc = {**dict.fromkeys(RECEIPT_KEYS), **doc}
    return doc


def unpack_manifest(view: memoryview) -> dict[str, Any]:
    """Inverse of :func:`pack_manifest` (each part's ``msg_id`` put back); the body must end with its last
    field. What the fields must hold is ``envelope.verify_manifest``'s to check, as for JSON."""
    r = _Reader(view, "binary manifest")
    doc = _read_map(r, MANIFEST_KEYS, MANIFEST_STRINGS, extended=True)
    if r.pos != len(view):
        raise WireError("schema", f"binary manifest: {len(view) - r.pos} bytes after its last field")
    for part in MANIFEST_PARTS:
        entry = doc.get(part)
        if isinstance(entry, dict):
            if "msg_id" in entry:
                raise WireError("schema", f"binary manifest: {part} carries a msg_id (it is v<version>-{part})")
            entry["msg_id"] = f"v{doc.get('version')}-{part}"
    return doc


def pack_status(doc: Mapping[str, Any]) -> bytes | None:
    """A status in binary (``FLH1 | map``), or None when the format cannot hold it (then it goes as JSON)."""
    body = pack_map(doc, STATUS_KEYS, STATUS_STRINGS, extended=True)
    return STATUS_MAGIC + body if body is not None and len(body) + 4 <= MAX_STATUS_BYTES else None


def unpack_status(view: memoryview) -> dict[str, Any]:
    """Inverse of :func:`pack_status` (magic included); ``WireError("schema")`` naming the fault."""
    if len(view) > MAX_STATUS_BYTES:
        raise WireError("schema", f"binary status of {len(view)} bytes, at most {MAX_STATUS_BYTES}")
    if bytes(view[:4]) != STATUS_MAGIC:
        raise WireError("schema", "not a binary status (no FLH1 magic)")
    r = _Reader(view[4:], "binary status")
    doc = _read_map(r, STATUS_KEYS, STATUS_STRINGS, extended=True)
    if r.pos != len(view) - 4:
        raise WireError("schema", f"binary status: {len(view) - 4 - r.pos} bytes after its last field")
    return doc


def read_status(payload: bytes | memoryview) -> dict[str, Any] | None:
    """A site's status, binary (FLH1) or JSON, as a dict; None when it is neither (the caller counts or ignores
    it: a status is unsigned and steers nothing but a catch-up and the format choice)."""
    view = memoryview(payload)
    if bytes(view[:4]) == STATUS_MAGIC:
        try:
            return unpack_status(view)
        except WireError:
            return None
    try:
        doc = json.loads(bytes(view))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None
