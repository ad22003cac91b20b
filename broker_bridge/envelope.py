"""The binary formats on the wire: tensors, sealed updates, signed manifests and receipts.

No pickle, ever: a pickle from the network is remote code execution. Every
format starts with a magic and a format version, carries metadata as canonical
JSON (sorted keys, no NaN) and tensors as raw little-endian arrays with dtype
and shape.

An update is **signed then sealed**: the site signs a SHA-256 digest of its
plaintext with Ed25519 (signing a SHA-256 digest, not megabytes: Ed25519 hashes its
message twice), then seals ``site id | verify key | signature | plaintext`` to
the aggregator's X25519 key with a NaCl SealedBox, so only the aggregator can
read it and the broker and other sites see ciphertext. Opening checks, in this
order, and raises :class:`WireError` naming the first that fails: ``framing``,
``version``, ``decrypt``, ``signature``, ``unenrolled``, ``replay``, ``schema``.

Manifests and receipts are **signed** by the aggregator, so an edge loads only
models the aggregator made and forgets an update only on a receipt the
aggregator signed. Manifests and model blobs then travel encrypted to the
federation (``broker_bridge.federation_key``).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _sodium
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import PublicKey, SealedBox
from nacl.secret import SecretBox
from nacl.signing import VerifyKey

from broker_bridge import binhead
from broker_bridge.errors import TopicError, WireError
from broker_bridge.keys import Enrollment, KeyPair, OpeningKey
from broker_bridge.sealopen import seal_open
from broker_bridge.topics import validate_site_id

FORMAT_VERSION = 1
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
MAX_HEADER_BYTES = 256 * 1024
MAX_TENSORS = 4096
MAX_NDIM = 8

_TENSOR_MAGIC = b"FLT1"
_TENSOR_REF_MAGIC = b"FLT2"  # the tensor table by reference: FLT2 | 16-byte layout id | raw data
LAYOUT_ID_BYTES = 16
#: wire formats beyond version 1's this build reads, named in every manifest (``"reads"``) so that a site sends
#: them only to an aggregator that reads them: tensor tables by reference, binary update headers, binary statuses
#: (``binhead.pack_status``), signature blocks without the verify key, an update in one message without the chunk
#: header (:func:`is_sealed_update`)
READS = ("FLT2", "FLU2", "FLH1", "FLS2", "FLC0")
MAX_LAYOUTS = 256  # layouts a process may register (each from its own model spec: a handful)
_UPDATE_MAGIC = b"FLU"
_SEALED_MAGIC = b"FLE"
_SIGNED_MAGIC = b"FLS1"
_SIGNED_KEYLESS_MAGIC = b"FLS2"  # the signature block without the verify key (the enrolled one checks it)
_MANIFEST_MAGIC = b"FLM"
_RECEIPT_MAGIC = b"FLR"
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_SIG_BYTES = int(_sodium.crypto_sign_bytes())
_SIGN_PUB_BYTES = int(_sodium.crypto_sign_publickeybytes())
#: FLU's version byte for a binary header (broker_bridge.binhead); 1 is the JSON header
BINARY_UPDATE_VERSION = 2

#: dtypes allowed on the wire (little-endian or byte-order-free)
DTYPES = ("<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "|b1")


def digest(data: bytes | memoryview, domain: bytes, *more: bytes | memoryview) -> bytes:
    """SHA-256 of ``domain || data || more...``: what gets signed, domain-separated per format.

    SHA-256 rather than BLAKE2b because this is the hot path of the aggregator
    (one pass over every update's plaintext) and OpenSSL's SHA-256 runs on the
    CPU's SHA extensions, about 3x faster than BLAKE2b on the machines we
    measured. Extra parts are hashed incrementally: no copy of a large delta.
    """
    h = hashlib.sha256(domain)
    h.update(data)
    for part in more:
        h.update(part)
    return h.digest()


def content_hash(data: bytes | memoryview) -> str:
    """Hex BLAKE2b-256 of a blob, as written in manifests."""
    return hashlib.blake2b(data, digest_size=32).hexdigest()


# --------------------------------------------------------------------------- JSON
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


# one decoder for every read: ``json.loads`` with a keyword builds a new JSONDecoder (and its scanner) per call,
# which cost as much as the parse itself on the aggregator's per-update path (two headers per update)
_STRICT_JSON = json.JSONDecoder(parse_constant=_reject_constant)


def canonical_json(doc: Mapping[str, Any]) -> bytes:
    """Sorted keys, no spaces, no NaN/Infinity: the same dict always gives the same bytes."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _load_json(raw: bytes | memoryview, reason: str, what: str) -> dict[str, Any]:
    try:
        doc = _STRICT_JSON.decode(str(raw, "utf-8"))  # decoded from the buffer itself: no copy first
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireError(reason, f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise WireError(reason, f"{what} must be a JSON object")
    return doc


# --------------------------------------------------------------------------- tensors
def encode_tensors(tensors: Mapping[str, np.ndarray], by_reference: bool = False) -> bytes:
    """Named arrays → ``FLT1 | u32 len | JSON [{name, dtype, shape}] | raw little-endian data``.

    ``by_reference``: ``FLT2 | layout id | raw data`` instead when the table is a registered layout
    (:func:`register_layout`: one this process derived from its own model spec); FLT1 otherwise.
    """
    return b"".join(tensor_parts(tensors, by_reference))


def tensor_parts(tensors: Mapping[str, np.ndarray], by_reference: bool = False) -> list[bytes | memoryview]:
    """:func:`encode_tensors`' bytes as parts in order, each array's a view of it: what a file is written
    from without joining a 4 MB copy first (the aggregator's checkpoints)."""
    meta = []
    blobs: list[memoryview] = []
    for name, arr in tensors.items():
        a = np.asarray(arr)
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder not in ("|", "<", "=") else a.dtype
        a = np.require(a, dtype=dt, requirements="C")  # not ascontiguousarray: it makes a 0-d array 1-d
        if a.dtype.str not in DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot go on the wire")
        meta.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape)})
        blobs.append(a.reshape(-1).view(np.uint8).data)  # joined straight from the array: no extra copy
    header = table_json(meta)
    if by_reference:
        lid = layout_id(header)
        if lid in _BY_ID:
            return [_TENSOR_REF_MAGIC, lid, *blobs]
    return [_TENSOR_MAGIC, _U32.pack(len(header)), header, *blobs]


def table_json(meta: list[dict[str, Any]]) -> bytes:
    """The canonical FLT1 tensor table: ``[{"name","dtype","shape"}]`` in tensor order, no spaces."""
    return json.dumps(meta, separators=(",", ":")).encode("utf-8")


def layout_id(table: bytes) -> bytes:
    """A layout's id: the first 16 bytes of SHA-256 over its canonical FLT1 table (names, dtypes, shapes, order)."""
    return hashlib.sha256(table).digest()[:LAYOUT_ID_BYTES]


def register_layout(table: bytes) -> bytes:
    """Make a layout readable as FLT2 in this process and return its id.

    Only tables a party derived from its *own* model spec are registered (``broker_bridge.layouts``), never
    one read off the wire: an FLT2 block whose id is not registered is refused, never guessed.
    """
    lid = layout_id(table)
    if lid not in _BY_ID:
        if len(_BY_ID) >= MAX_LAYOUTS:
            raise ValueError(f"more than {MAX_LAYOUTS} tensor layouts registered")
        _BY_ID[lid] = _parse_layout(table, "schema")
    return lid


def decode_tensors(blob: bytes | memoryview, reason: str = "schema") -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_tensors` (FLT1, or FLT2 of a registered layout). Arrays are read-only views
    into ``blob``.

    Every length is checked before it is used, so random bytes give a
    :class:`WireError`, never a crash or a huge allocation.
    """
    view = memoryview(blob)
    if len(view) >= 4 + LAYOUT_ID_BYTES and bytes(view[:4]) == _TENSOR_REF_MAGIC:
        lid = bytes(view[4 : 4 + LAYOUT_ID_BYTES])
        layout = _BY_ID.get(lid)
        if layout is None:
            raise WireError(reason, f"FLT2 tensor layout {lid.hex()} is not one derived from this party's model spec")
        return _read_arrays(view, 4 + LAYOUT_ID_BYTES, layout, reason)
    if len(view) < 8 or bytes(view[:4]) != _TENSOR_MAGIC:
        raise WireError(reason, "tensor block does not start with FLT1 or FLT2")
    (hlen,) = _U32.unpack_from(view, 4)
    if hlen > MAX_HEADER_BYTES or 8 + hlen > len(view):
        raise WireError(reason, f"tensor header length {hlen} does not fit the block")
    return _read_arrays(view, 8 + hlen, _tensor_layout(bytes(view[8 : 8 + hlen]), reason), reason)


def _read_arrays(view: memoryview, pos: int, layout: Layout, reason: str) -> dict[str, np.ndarray]:
    """The arrays of ``layout`` from ``view[pos:]``, which must hold exactly their bytes.

    Over memory that cannot move (``bytes``, a NumPy array: the opener's plaintext) each array is made in one call,
    ``np.ndarray(shape, dtype, view, offset)``: 0.65 us against 2 us for ``np.frombuffer`` and ``reshape`` (the same
    address, shape, strides and flags; about 5 us per 100k-parameter update of four tensors). That array keeps the
    memory's owner alive but not the buffer export ``np.frombuffer`` keeps, which is what stops a ``bytearray`` from
    being resized under its views: any other owner gets ``np.frombuffer`` as before.
    """
    out: dict[str, np.ndarray] = {}
    fixed = isinstance(view.obj, (bytes, np.ndarray))
    for name, dt, shape, count in layout:
        nbytes = count * dt.itemsize
        if pos + nbytes > len(view):
            raise WireError(reason, f"tensor {name!r}: {nbytes} bytes declared, {len(view) - pos} left in the block")
        if fixed:
            out[name] = np.ndarray(shape, dt, view, pos)
        else:
            out[name] = np.frombuffer(view, dtype=dt, count=count, offset=pos).reshape(shape)
        pos += nbytes
    if pos != len(view):
        raise WireError(reason, f"{len(view) - pos} trailing bytes after the last tensor")
    return out


Layout = tuple[tuple[str, np.dtype[Any], tuple[int, ...], int], ...]  # (name, dtype, shape, values) per tensor

# tensor headers already read, by their exact bytes: every update of a model carries the same one, so the
# aggregator parses and checks it once, not on every update (about 20 us each). Only short headers are kept,
# at most _LAYOUTS_MAX of them: a few hundred KB whatever the input
_LAYOUTS: dict[bytes, Layout] = {}
_LAYOUTS_MAX = 64
_LAYOUT_CACHED_BYTES = 4096
# layouts readable as FLT2, by id: registered from this process's own model spec (register_layout), never learnt
_BY_ID: dict[bytes, Layout] = {}


def _tensor_layout(raw: bytes, reason: str) -> Layout:
    """The tensors a header declares, checked (a pure function of its bytes: cached for short headers)."""
    layout = _LAYOUTS.get(raw)
    if layout is None:
        layout = _parse_layout(raw, reason)
        if len(raw) <= _LAYOUT_CACHED_BYTES:
            if len(_LAYOUTS) >= _LAYOUTS_MAX:
                _LAYOUTS.clear()
            _LAYOUTS[raw] = layout
    return layout


def _parse_layout(raw: bytes, reason: str) -> Layout:
    try:
        meta = _STRICT_JSON.decode(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireError(reason, f"tensor header is not valid JSON: {exc}") from None
    if not isinstance(meta, list) or len(meta) > MAX_TENSORS:
        raise WireError(reason, f"tensor header must be a list of at most {MAX_TENSORS} entries")
    out: list[tuple[str, np.dtype[Any], tuple[int, ...], int]] = []
    names: set[str] = set()
    for i, m in enumerate(meta):
        if not isinstance(m, dict) or set(m) != {"name", "dtype", "shape"}:
            raise WireError(reason, f"tensor entry {i} must have exactly name, dtype, shape")
        name, dtype, shape = m["name"], m["dtype"], m["shape"]
        if not isinstance(name, str) or not name or name in names:
            raise WireError(reason, f"tensor entry {i}: missing or duplicate name {name!r}")
        if dtype not in DTYPES:
            raise WireError(reason, f"tensor {name!r}: dtype {dtype!r} not allowed")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)
        ):
            raise WireError(reason, f"tensor {name!r}: bad shape {shape!r}")
        names.add(name)
        out.append((name, np.dtype(dtype), tuple(shape), math.prod(shape)))
    return tuple(out)


# --------------------------------------------------------------------------- updates
@dataclass(frozen=True)
class UpdateHeader:
    """What an update says about itself; signed together with its tensors."""

    site: str
    counter: int  # per-site, strictly increasing: the replay guard
    msg_id: str
    base_version: int  # the global version the delta was trained from
    n_samples: int
    privacy: dict[str, Any] = field(
        default_factory=dict
    )  # clip_norm, noise_multiplier, sample_rate, steps, epsilon, delta
    created_at: float = field(default_factory=time.time)
    format: int = FORMAT_VERSION
    # how the tensors encode the delta (broker_bridge.quantised): "float32", or "int8" with block steps.
    # Left out of the signed JSON when float32, so a float32 update reads the same to an older aggregator
    encoding: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        if doc["encoding"] == "float32":
            del doc["encoding"]
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> UpdateHeader:
        """Validate types of every field; raise ``WireError('schema')`` naming the field."""
        expected = _HEADER_FIELDS
        if not _HEADER_REQUIRED <= doc.keys() <= _HEADER_KEYS:  # else name what is wrong (two set tests per update)
            missing = [k for k in expected if k not in doc and k not in _HEADER_OPTIONAL]
            if missing:
                raise WireError("schema", f"update header lacks {', '.join(missing)}")
            extra = sorted(set(doc) - set(expected))
            raise WireError("schema", f"update header has unknown fields {', '.join(extra)}")
        for k, v in doc.items():  # JSON's own types pass by one set test each: 0.8 us less per update
            if type(v) not in _HEADER_EXACT[k]:
                _check_header_types(doc)  # in the fields' order: raises naming the first field of a wrong type
                break
        for k in ("counter", "base_version", "n_samples"):
            if doc[k] < 0:
                raise WireError("schema", f"update header field {k!r} is negative")
        try:
            validate_site_id(doc["site"])
            validate_site_id(doc["msg_id"], "message id")
        except TopicError as exc:
            raise WireError("schema", str(exc)) from None
        for k, v in doc["privacy"].items():
            if not isinstance(v, (int, float, str)) and v is not None:
                raise WireError("schema", f"privacy field {k!r} must be a number, string or null")
        # every field is checked above: set them as they are, without the frozen dataclass's __init__ (one
        # object.__setattr__ per field, about a third of this function's time on every update)
        header = object.__new__(cls)
        header.__dict__.update(doc)
        if "encoding" not in doc:
            header.__dict__["encoding"] = "float32"
        return header


# an update header's fields and their JSON types (read on every update: built once)
_HEADER_FIELDS: dict[str, type | tuple[type, ...]] = {
    "site": str,
    "counter": int,
    "msg_id": str,
    "base_version": int,
    "n_samples": int,
    "privacy": dict,
    "created_at": (int, float),
    "format": int,
    "encoding": str,
}
_HEADER_OPTIONAL = frozenset({"encoding"})  # absent: float32
_HEADER_KEYS = frozenset(_HEADER_FIELDS)
_HEADER_REQUIRED = _HEADER_KEYS - _HEADER_OPTIONAL
# the exact types JSON decodes each field to (a bool is not one): such a field needs no isinstance test
_HEADER_EXACT: dict[str, frozenset[type]] = {
    k: frozenset(tp if isinstance(tp, tuple) else (tp,)) for k, tp in _HEADER_FIELDS.items()
}


def _check_header_types(doc: Mapping[str, Any]) -> None:
    """Each field's type, in the fields' order (``WireError('schema')`` naming the first wrong one): what
    :meth:`UpdateHeader.from_dict` runs when a field is not of the exact type JSON gives (a bool, a subclass)."""
    for k, tp in _HEADER_FIELDS.items():
        if k not in doc:
            continue
        v = doc[k]
        if not isinstance(v, tp) or isinstance(v, bool):
            raise WireError("schema", f"update header field {k!r} has the wrong type ({v!r})")


def encode_update(
    header: UpdateHeader, tensors: Mapping[str, np.ndarray], by_reference: bool = False, binary: bool = False
) -> bytes:
    """Plaintext of an update: ``FLU | 1 | u32 len | header JSON | tensors``, or with ``binary``
    ``FLU | 2 | binary header | tensors`` (:mod:`broker_bridge.binhead`; JSON when the header does not fit it).
    The tensors as FLT2 with ``by_reference``."""
    doc = header.to_dict()
    block = binhead.pack(doc) if binary else None
    tensors_blob = encode_tensors(tensors, by_reference)
    if block is not None:
        return b"".join([_UPDATE_MAGIC, bytes([BINARY_UPDATE_VERSION]), block, tensors_blob])
    head = canonical_json(doc)
    return b"".join([_UPDATE_MAGIC, bytes([FORMAT_VERSION]), _U32.pack(len(head)), head, tensors_blob])


def _decode_update_header(plain: memoryview, site: str = "") -> tuple[dict[str, Any], memoryview]:
    """The header dict and the tensor block of an update's plaintext (JSON or binary header). ``site``: the
    signer's, which a binary header leaves out (the benches that only want the tensors may leave it empty)."""
    if len(plain) < 6 or bytes(plain[:3]) != _UPDATE_MAGIC:
        raise WireError("schema", "plaintext is not an update (no FLU magic)")
    if plain[3] == BINARY_UPDATE_VERSION:
        doc, used = binhead.unpack(plain[4:], site)
        return doc, plain[4 + used :]
    if plain[3] != FORMAT_VERSION:
        raise WireError(
            "version",
            f"update plaintext format {plain[3]}, this build reads {FORMAT_VERSION} and {BINARY_UPDATE_VERSION}",
        )
    if len(plain) < 8:
        raise WireError("schema", "update plaintext is truncated")
    (hlen,) = _U32.unpack_from(plain, 4)
    if hlen > MAX_HEADER_BYTES or 8 + hlen > len(plain):
        raise WireError("schema", f"update header length {hlen} does not fit")
    return _load_json(plain[8 : 8 + hlen], "schema", "update header"), plain[8 + hlen :]


_UPDATE_DOMAIN = b"fedline-update-v1\x00"


def _tensor_data_at(inner: memoryview) -> int | None:
    """Where the first tensor's bytes start in a sealed update's content, read from its first bytes (None when
    they do not say): ``seal_open`` puts that offset on an aligned address, so no tensor needs a copy
    (``aggregator.aligned``). A placement hint only: the layout is checked after the box opens."""
    if len(inner) < 5:
        return None
    keyed = 32 if bytes(inner[:4]) == _SIGNED_MAGIC else 0  # FLS2 leaves the verify key out
    at = 5 + inner[4] + keyed + 64  # signed magic, site length, site, verify key (FLS1), signature
    if len(inner) < at + 8:
        return None
    if inner[at + 3] == BINARY_UPDATE_VERSION:
        at += 6 + _U16.unpack_from(inner, at + 4)[0]  # FLU, 2, binary header length, binary header
    else:
        at += 8 + _U32.unpack_from(inner, at + 4)[0]  # FLU, version, header length, header JSON
    if len(inner) < at + 8:
        return None
    if bytes(inner[at : at + 4]) == _TENSOR_REF_MAGIC:
        return at + 4 + LAYOUT_ID_BYTES  # FLT2, layout id
    return at + 8 + int(_U32.unpack_from(inner, at + 4)[0])  # FLT1, tensor header length, tensor header JSON


def is_sealed_update(payload: bytes | memoryview) -> bool:
    """Whether a message on an update topic is a whole sealed update (``FLE | 1``) rather than a chunk (``FLC1``):
    sent so, without the chunk header, to an aggregator that reads ``FLC0`` when it fits in one message."""
    return bytes(payload[:4]) == _SEALED_MAGIC + bytes([FORMAT_VERSION])


def seal_update(
    header: UpdateHeader,
    tensors: Mapping[str, np.ndarray],
    site_keys: KeyPair,
    aggregator_box_pub: bytes,
    by_reference: bool = False,
    binary: bool = False,
    keyless: bool = False,
) -> bytes:
    """Sign (Ed25519 over a SHA-256 digest) and seal (X25519 SealedBox) one update.

    ``by_reference``: the tensors as FLT2 when their table is a registered layout (only for an aggregator
    whose manifest says it reads FLT2, :data:`READS`); ``binary``: the header in binary (FLU version 2, for one
    that reads FLU2); ``keyless``: the signature block without the verify key (FLS2, for one that reads it:
    it checks the signature with the site's enrolled key)."""
    if header.site != site_keys.ident:
        raise ValueError(f"header site {header.site!r} is not the key's site {site_keys.ident!r}")
    plain = encode_update(header, tensors, by_reference, binary)
    site = header.site.encode()
    sig = site_keys.signing_key.sign(digest(site, _UPDATE_DOMAIN, b"\x00", plain)).signature
    vk = b"" if keyless else bytes(site_keys.signing_key.verify_key)
    inner = b"".join([_SIGNED_KEYLESS_MAGIC if keyless else _SIGNED_MAGIC, bytes([len(site)]), site, vk, sig, plain])
    return _SEALED_MAGIC + bytes([FORMAT_VERSION]) + SealedBox(PublicKey(aggregator_box_pub)).encrypt(inner)


def open_update(
    blob: bytes | memoryview,
    aggregator_keys: KeyPair | OpeningKey,
    enrollment: Enrollment,
    is_new_counter: Callable[[str, int], bool] = lambda site, counter: True,
    max_bytes: int = MAX_MESSAGE_BYTES,
    tensor_bytes: int | None = None,
) -> tuple[UpdateHeader, dict[str, np.ndarray]]:
    """Open, verify and parse a sealed update, or raise :class:`WireError` naming the first failure.

    ``tensor_bytes``: the size of the tensor data the receiver expects (its model's, as float32): the tensors
    end the plaintext, so that many last bytes are opened onto an aligned address straight away; an update of
    another size is placed from its first bytes instead (:func:`_tensor_data_at`)."""
    view = memoryview(blob)
    if len(view) < 4 + 48:  # magic, version, SealedBox overhead (32-byte key + 16-byte MAC)
        raise WireError("framing", f"{len(view)} bytes is too short for a sealed update")
    if len(view) > max_bytes:
        raise WireError("framing", f"{len(view)} bytes exceeds the limit of {max_bytes}")
    if bytes(view[:3]) != _SEALED_MAGIC:
        raise WireError("framing", "not a sealed update (no FLE magic)")
    if view[3] != FORMAT_VERSION:
        raise WireError("version", f"sealed update format {view[3]}, this build reads {FORMAT_VERSION}")
    try:
        # in place, without the GIL, no copies; the tensors placed where NumPy reads them at full speed
        inner = seal_open(view[4:], aggregator_keys.box_key, place=_tensor_data_at, tail=tensor_bytes)
    except CryptoError:
        raise WireError(
            "decrypt", "ciphertext does not open with this aggregator's key (tampered, or sealed to another aggregator)"
        ) from None
    site, plain = _signed_by(inner, enrollment)
    doc, rest = _decode_update_header(plain, site)
    counter = doc.get("counter")
    if not isinstance(counter, int) or isinstance(counter, bool):
        raise WireError("schema", "update header has no integer counter")
    if not is_new_counter(site, counter):
        raise WireError("replay", f"site {site!r} counter {counter} was seen before")
    header = UpdateHeader.from_dict(doc)
    if header.site != site:
        raise WireError("schema", f"header names site {header.site!r}, signer is {site!r}")
    tensors = decode_tensors(rest, "schema")
    return header, tensors


def _signed_by(inner: memoryview, enrollment: Enrollment) -> tuple[str, memoryview]:
    """The enrolled site that signed an opened update, and its plaintext (``WireError`` naming the failure).

    FLS1 carries the signer's verify key: the signature is checked against it (is the message intact and
    signed at all?), then the key against the one enrolled for the site it names. FLS2 leaves the key out (32
    bytes: the aggregator holds every enrolled key): the site must be enrolled, and the signature must verify
    with its enrolled key, else ``unenrolled`` as for FLS1's "signed by another key" (a key rotated out, an
    impostor): the sealed box already held, so what fails is the signer, and a signature over other bytes
    cannot be told apart from one by another key."""
    keyed = bytes(inner[:4]) == _SIGNED_MAGIC
    if len(inner) < 5 or not (keyed or bytes(inner[:4]) == _SIGNED_KEYLESS_MAGIC):
        raise WireError("signature", "no signature block inside the sealed update")
    slen = inner[4]
    at = 5 + slen + (32 if keyed else 0)
    if len(inner) < at + 64:
        raise WireError("signature", "signature block is truncated")
    site_raw = bytes(inner[5 : 5 + slen])
    site = site_raw.decode("utf-8", errors="replace")
    enrolled = enrollment.sites.get(site)
    if not keyed and enrolled is None:
        raise WireError("unenrolled", f"site {site!r} is not enrolled in federation {enrollment.federation!r}")
    vk_raw = bytes(inner[5 + slen : at]) if keyed else enrolled.sign_pub  # type: ignore[union-attr]
    sig, plain = bytes(inner[at : at + 64]), inner[at + 64 :]
    if not _verify_detached(digest(site_raw, _UPDATE_DOMAIN, b"\x00", plain), sig, vk_raw):
        if keyed:
            raise WireError("signature", "signature does not verify") from None
        raise WireError("unenrolled", f"update claims site {site!r} but is not signed by its enrolled key") from None
    if enrolled is None:
        raise WireError("unenrolled", f"site {site!r} is not enrolled in federation {enrollment.federation!r}")
    if enrolled.sign_pub != vk_raw:
        raise WireError("unenrolled", f"update claims site {site!r} but is signed by another key")
    return site, plain


def _verify_detached(message: bytes, sig: bytes, sign_pub: bytes) -> bool:
    """Whether ``sig`` is ``sign_pub``'s Ed25519 signature of ``message``: libsodium's ``crypto_sign_open``, the
    check ``VerifyKey(sign_pub).verify(message, sig)`` makes, called directly (no key object, no checks of types
    this function's callers already know, no copy of the message out: a few us of Python per update)."""
    if len(sig) != _SIG_BYTES or len(sign_pub) != _SIGN_PUB_BYTES:
        return False
    signed = sig + message
    out = _ffi.new("unsigned char[]", len(signed))
    return bool(_sodium.crypto_sign_open(out, _ffi.NULL, signed, len(signed), sign_pub) == 0)


# --------------------------------------------------------------------------- signed documents
def _sign_doc(magic: bytes, domain: bytes, doc: Mapping[str, Any], keys: KeyPair) -> bytes:
    return sign_body(magic, domain, canonical_json(doc), keys)


def sign_body(magic: bytes, domain: bytes, body: bytes, keys: KeyPair) -> bytes:
    """Frame and sign raw body bytes: ``magic | ver | signature | body``.

    Public so that fuzzers and hostile-input tests sign arbitrary (even
    malformed) bodies with the real framing instead of copying it.
    """
    sig = keys.signing_key.sign(digest(body, domain)).signature
    return magic + bytes([FORMAT_VERSION]) + sig + body


def verify_body(
    magic: bytes, domain: bytes, what: str, blob: bytes | memoryview, sign_pub: bytes, required: tuple[str, ...]
) -> dict[str, Any]:
    """Inverse of :func:`sign_body` for a JSON body: check framing, signature and required fields."""
    view = memoryview(blob)
    if len(view) < 4 + 64 + 2 or len(view) > MAX_HEADER_BYTES * 4:
        raise WireError("framing", f"{len(view)} bytes is not the size of a {what}")
    if bytes(view[:3]) != magic:
        raise WireError("framing", f"not a {what} (no {magic.decode()} magic)")
    if view[3] != FORMAT_VERSION:
        raise WireError("version", f"{what} format {view[3]}, this build reads {FORMAT_VERSION}")
    sig, body = bytes(view[4:68]), view[68:]
    try:
        VerifyKey(sign_pub).verify(digest(body, domain), sig)
    except (BadSignatureError, ValueError, TypeError):
        raise WireError("signature", f"{what} signature does not verify with the aggregator's key") from None
    doc = _load_json(body, "schema", what)
    missing = [k for k in required if k not in doc]
    if missing:
        raise WireError("schema", f"{what} lacks {', '.join(missing)}")
    return doc


_MANIFEST_DOMAIN = b"fedline-manifest-v1\x00"
_RECEIPT_DOMAIN = b"fedline-receipt-v1\x00"
_RECEIPT_DOMAIN_V2 = b"fedline-receipt-v2\x00"  # the binary body: a signature of one form never checks as the other's
_RECEIPT_DOMAIN_V3 = b"fedline-receipt-v3\x00"  # the compact binary body (FLR version 3), likewise
_MANIFEST_DOMAIN_V3 = b"fedline-manifest-v3\x00"  # the binary body (FLM version 3), likewise
#: FLM's version byte for a binary body (:func:`broker_bridge.binhead.pack_manifest`); 1 is the JSON body. Not 2:
#: the name a status reads it by is "FLM3" ("FLM2" was taken by ``spec_hash`` in a JSON body)
BINARY_MANIFEST_VERSION = 3
#: FLR's version byte for a binary body (broker_bridge.binhead.pack_receipt); 1 is the JSON body
BINARY_RECEIPT_VERSION = 2
MANIFEST_FIELDS = ("federation", "version", "created_at", "spec", "weights", "onnx")
#: a manifest may name its spec by hash instead (``spec_hash``, FLM2): exactly one of the two
SPEC_HASH_CHARS = 32
RECEIPT_FIELDS = ("site", "counter", "msg_id", "verdict", "reason", "version")
VERDICTS = ("applied", "buffered", "stale", "rejected")


def sign_manifest(doc: Mapping[str, Any], aggregator_keys: KeyPair, binary: bool = False) -> bytes:
    """A global model's manifest, signed by the aggregator (published retained).

    ``binary`` (when every enrolled site's status reads FLM3): ``FLM | 3 | signature | binary body``
    (:func:`broker_bridge.binhead.pack_manifest`, about 200 bytes where the JSON took about 570), signed under
    a domain of its own; JSON when the body does not fit the binary form (e.g. it carries the whole spec)."""
    body = binhead.pack_manifest(doc) if binary else None
    if body is None:
        return _sign_doc(_MANIFEST_MAGIC, _MANIFEST_DOMAIN, doc, aggregator_keys)
    sig = aggregator_keys.signing_key.sign(digest(body, _MANIFEST_DOMAIN_V3)).signature
    return _MANIFEST_MAGIC + bytes([BINARY_MANIFEST_VERSION]) + sig + body


def verify_manifest(blob: bytes | memoryview, aggregator_sign_pub: bytes) -> dict[str, Any]:
    """Check a manifest's signature and required fields (JSON, or the binary body of FLM version 3); return it
    as a dict."""
    required = tuple(f for f in MANIFEST_FIELDS if f != "spec")
    view = memoryview(blob)
    if len(view) >= 4 + 64 + 1 and bytes(view[:3]) == _MANIFEST_MAGIC and view[3] == BINARY_MANIFEST_VERSION:
        doc = _verify_binary(view, aggregator_sign_pub, _MANIFEST_DOMAIN_V3, "manifest", binhead.unpack_manifest)
        missing = [k for k in required if k not in doc]
        if missing:
            raise WireError("schema", f"manifest lacks {', '.join(missing)}")
    else:
        doc = verify_body(_MANIFEST_MAGIC, _MANIFEST_DOMAIN, "manifest", view, aggregator_sign_pub, required)
    if ("spec" in doc) == ("spec_hash" in doc):
        raise WireError("schema", "manifest must carry exactly one of spec and spec_hash")
    h = doc.get("spec_hash")
    if h is not None and not (
        isinstance(h, str) and len(h) == SPEC_HASH_CHARS and all(c in "0123456789abcdef" for c in h)
    ):
        raise WireError("schema", f"manifest spec_hash must be {SPEC_HASH_CHARS} lowercase hex digits")
    if not isinstance(doc["version"], int) or isinstance(doc["version"], bool) or doc["version"] < 0:
        raise WireError("schema", "manifest version must be a non-negative integer")
    for part in ("weights", "onnx"):
        entry = doc[part]
        if not isinstance(entry, dict) or not {"hash", "size", "chunks"} <= set(entry):
            raise WireError("schema", f"manifest {part} must have hash, size, chunks")
    return doc


def spec_hash(spec_doc: Mapping[str, Any]) -> str:
    """A model spec's hash as a manifest names it (``spec_hash``): the first 16 bytes of SHA-256 over its
    canonical JSON, in hex."""
    return hashlib.sha256(canonical_json(spec_doc)).hexdigest()[:SPEC_HASH_CHARS]


def sign_receipt(
    doc: Mapping[str, Any], aggregator_keys: KeyPair, binary: bool = False, compact: bool = False
) -> bytes:
    """The aggregator's verdict on one update, signed; only this lets a site forget it.

    ``binary`` (for a site whose status reads FLR2): ``FLR | 2 | signature | binary body``
    (:func:`broker_bridge.binhead.pack_receipt`), signed under a domain of its own; ``compact`` too (for one
    that reads FLR3): ``FLR | 3 | ...``, nulls left out and the message id raw, under a domain of its own again;
    JSON when the body does not fit the binary form."""
    body = binhead.pack_receipt(doc, compact) if binary else None
    if body is None:
        return _sign_doc(_RECEIPT_MAGIC, _RECEIPT_DOMAIN, doc, aggregator_keys)
    domain, version = (_RECEIPT_DOMAIN_V3, 3) if compact else (_RECEIPT_DOMAIN_V2, BINARY_RECEIPT_VERSION)
    sig = aggregator_keys.signing_key.sign(digest(body, domain)).signature
    return _RECEIPT_MAGIC + bytes([version]) + sig + body


_SEALED_RECEIPT_MAGIC = b"FLQ"


def seal_receipt(
    doc: Mapping[str, Any], aggregator_keys: KeyPair, site_box_pub: bytes, binary: bool = False, compact: bool = False
) -> bytes:
    """A signed receipt sealed to its site: ``FLQ | ver | SealedBox(site X25519 key, FLR signed receipt)``.

    Sealed because a receipt says, per site, which counters were sent, when,
    how stale and with what verdict and weight: the broker operator and other
    sites must not read a plant's cadence off it (issue 13).
    """
    return (
        _SEALED_RECEIPT_MAGIC
        + bytes([FORMAT_VERSION])
        + SealedBox(PublicKey(site_box_pub)).encrypt(sign_receipt(doc, aggregator_keys, binary, compact))
    )


def open_receipt(blob: bytes | memoryview, site_keys: KeyPair, aggregator_sign_pub: bytes) -> dict[str, Any]:
    """Open a receipt sealed to this site and verify it (:class:`WireError` naming what is wrong)."""
    view = memoryview(blob)
    if len(view) < 4 + 48 or len(view) > MAX_HEADER_BYTES * 4:
        raise WireError("framing", f"{len(view)} bytes is not the size of a sealed receipt")
    if bytes(view[:3]) != _SEALED_RECEIPT_MAGIC:
        raise WireError("framing", "not a sealed receipt (no FLQ magic)")
    if view[3] != FORMAT_VERSION:
        raise WireError("version", f"sealed receipt format {view[3]}, this build reads {FORMAT_VERSION}")
    try:
        inner = SealedBox(site_keys.box_key).decrypt(bytes(view[4:]))
    except CryptoError:
        raise WireError("decrypt", f"receipt is not sealed to site {site_keys.ident!r}") from None
    doc = verify_receipt(inner, aggregator_sign_pub)
    if doc["site"] != site_keys.ident:
        raise WireError("schema", f"receipt for site {doc['site']!r} sealed to {site_keys.ident!r}")
    return doc


def verify_receipt(blob: bytes | memoryview, aggregator_sign_pub: bytes) -> dict[str, Any]:
    """Check a receipt's signature and fields (JSON, or the binary body of FLR version 2); return it as a dict."""
    view = memoryview(blob)
    if len(view) >= 4 + 64 + 1 and bytes(view[:3]) == _RECEIPT_MAGIC and view[3] in (BINARY_RECEIPT_VERSION, 3):
        doc = _verify_binary_receipt(view, aggregator_sign_pub)
    else:
        doc = verify_body(_RECEIPT_MAGIC, _RECEIPT_DOMAIN, "receipt", view, aggregator_sign_pub, RECEIPT_FIELDS)
    if doc["verdict"] not in VERDICTS:
        raise WireError("schema", f"receipt verdict {doc['verdict']!r} is not one of {VERDICTS}")
    if not isinstance(doc["counter"], int) or isinstance(doc["counter"], bool):
        raise WireError("schema", "receipt counter must be an integer")
    return doc


def _verify_binary(
    view: memoryview, sign_pub: bytes, domain: bytes, what: str, unpack: Callable[[memoryview], dict[str, Any]]
) -> dict[str, Any]:
    """A binary body's signature (``magic | ver | signature | body``), then its decoding: the bytes of a
    body are read only once the aggregator's signature over them holds."""
    if len(view) > MAX_HEADER_BYTES:
        raise WireError("framing", f"{len(view)} bytes is not the size of a {what}")
    sig, body = bytes(view[4:68]), view[68:]
    try:
        VerifyKey(sign_pub).verify(digest(body, domain), sig)
    except (BadSignatureError, ValueError, TypeError):
        raise WireError("signature", f"{what} signature does not verify with the aggregator's key") from None
    return unpack(body)


def _verify_binary_receipt(view: memoryview, aggregator_sign_pub: bytes) -> dict[str, Any]:
    compact = view[3] == 3
    domain = _RECEIPT_DOMAIN_V3 if compact else _RECEIPT_DOMAIN_V2
    doc = _verify_binary(view, aggregator_sign_pub, domain, "receipt", lambda b: binhead.unpack_receipt(b, compact))
    missing = [k for k in RECEIPT_FIELDS if k not in doc]
    if missing:
        raise WireError("schema", f"receipt lacks {', '.join(missing)}")
    return doc


# --------------------------------------------------------------------------- federation secret
def seal_for_federation(blob: bytes, federation_key: bytes) -> bytes:
    """Encrypt a model blob to the federation (the epoch's content key, ``broker_bridge.federation_key``)."""
    return SecretBox(federation_key).encrypt(blob)


def open_for_federation(blob: bytes, federation_key: bytes) -> bytes:
    """Decrypt a model blob sealed with :func:`seal_for_federation`."""
    try:
        return SecretBox(federation_key).decrypt(blob)
    except CryptoError:
        raise WireError("decrypt", "model blob does not open with the federation key") from None
