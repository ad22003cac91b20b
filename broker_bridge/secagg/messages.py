"""Secure-aggregation messages: who signs, who can read, what each one binds.

* **Cohort announcement** (aggregator -> all, signed, retained): cohort id, federation, base
  version, sorted members, threshold t, minimum survivors, deadline, quantisation range and the
  members' aggregator-assigned weights. Its BLAKE2b hash (the *cohort hash*) is bound into every
  seed, bundle, commitment and answer of the cohort.
* **Share bundle** (member i -> member k, relayed by the aggregator): the n shares member i deals
  to k (slot p holds i's self-mask share if p is i's own position, else a share of the pair seed
  s_{i,members[p]}), signed by i's Ed25519 key, sealed to k's X25519 key: the aggregator and the
  broker see ciphertext only.
* **Leaf commitments**: BLAKE2b of (cohort, dealer, recipient, slot, share); the dealer's signed
  update carries one root per recipient (the hash of that bundle's n leaves), so the aggregator
  can check every share it is given without seeing the others.
* **Survivors announcement** (aggregator -> members, signed): who submitted (S) and who did not (D).
* On the wire the two announcements travel sealed under the federation content key
  (:func:`broker_bridge.federation_key.seal_notice`) and each unmask request sealed to its member's
  X25519 key: the broker operator learns neither who is in a cohort nor who survived.
* **Ack** (member -> aggregator): the member's Ed25519 signature of the survivors announcement.
  A member acks one survivors announcement per cohort, and answers only a request carrying >= t
  acks of the same announcement (Bonawitz's consistency check): with t > n/2 an aggregator cannot
  get two different announcements answered.
* **Answer** (member -> aggregator, rides the normal signed+sealed channel): for each dealer in S,
  its self-mask share; for each dealer in S and dropped j, its share of s_ij; plus the leaves.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import PublicKey, SealedBox
from nacl.signing import VerifyKey

from broker_bridge import envelope
from broker_bridge.errors import SecAggError, TopicError, WireError
from broker_bridge.keys import Enrollment, KeyPair
from broker_bridge.secagg import shamir
from broker_bridge.topics import validate_site_id

_COHORT_MAGIC, _COHORT_DOMAIN = b"FLA", b"fedline-secagg-cohort-v1\x00"
_SURVIVORS_MAGIC, _SURVIVORS_DOMAIN = b"FLV", b"fedline-secagg-survivors-v1\x00"
_ACK_DOMAIN = b"fedline-secagg-ack-v1\x00"
_BUNDLE_MAGIC, _BUNDLE_DOMAIN = b"FLB1", b"fedline-secagg-bundle-v1\x00"
_SUBMISSION_MAGIC = b"FLQ1"
_REQUEST_MAGIC = b"FLP"  # an unmask request sealed to its member
_U32 = struct.Struct("<I")
MAX_MEMBERS = 1000


def blob_hash(blob: bytes) -> bytes:
    """The hash that names a signed announcement (cohort hash, survivors hash)."""
    return hashlib.blake2b(blob, digest_size=32, person=b"fedline-sa-ann").digest()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: Any, what: str, length: int | None = None) -> bytes:
    if not isinstance(text, str):
        raise SecAggError("schema", f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise SecAggError("schema", f"{what} is not valid base64") from None
    if length is not None and len(raw) != length:
        raise SecAggError("schema", f"{what} must be {length} bytes, got {len(raw)}")
    return raw


def _site(value: Any, what: str) -> str:
    try:
        return validate_site_id(value, what)
    except (TopicError, TypeError) as exc:
        raise SecAggError("schema", str(exc)) from None


def _int(doc: Mapping[str, Any], key: str, what: str, lo: int = 0) -> int:
    v = doc.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise SecAggError("schema", f"{what} field {key!r} must be an integer >= {lo}, got {v!r}")
    return v


def _num(doc: Mapping[str, Any], key: str, what: str) -> float:
    v = doc.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise SecAggError("schema", f"{what} field {key!r} must be a finite number, got {v!r}")
    return float(v)


def _verify_signed(
    magic: bytes, domain: bytes, what: str, blob: bytes, sign_pub: bytes, fields: tuple[str, ...]
) -> dict[str, Any]:
    try:
        doc = envelope.verify_body(magic, domain, what, blob, sign_pub, fields)  # one framing for signed docs
    except WireError as exc:
        raise SecAggError("signature" if exc.reason == "signature" else "schema", exc.detail) from None
    extra = sorted(set(doc) - set(fields))
    if extra:
        raise SecAggError("schema", f"{what} has unknown fields {', '.join(extra)}")
    return doc


def _verify_site(enrollment: Enrollment, site: str, domain: bytes, plain: bytes, sig: bytes, what: str) -> None:
    """Raise unless ``sig`` is the enrolled ``site``'s Ed25519 signature of ``plain`` in ``domain``."""
    keys = enrollment.sites.get(site)
    if keys is None:
        raise SecAggError("not_member", f"{what} from {site!r}, who is not enrolled")
    try:
        VerifyKey(keys.sign_pub).verify(envelope.digest(plain, domain), sig)
    except (BadSignatureError, ValueError, TypeError):
        raise SecAggError("signature", f"{what} claimed from {site!r} is not signed by it") from None


# --------------------------------------------------------------------------- cohort announcement
COHORT_FIELDS = (
    "federation",
    "cohort",
    "base_version",
    "members",
    "threshold",
    "min_survivors",
    "deadline",
    "created_at",
    "clip_range",
    "weights",
)


@dataclass(frozen=True)
class CohortAnnouncement:
    """A FedBuff buffer turned cohort: who masks together, on which base, until when."""

    federation: str
    cohort: str  # random id chosen by the aggregator
    base_version: int
    members: tuple[str, ...]  # sorted, unique
    threshold: int  # t > n/2: shares needed to reconstruct a secret
    min_survivors: int  # the cohort fails below this many submitted updates (>= min_sites)
    deadline: float
    created_at: float
    clip_range: float  # per-coordinate quantisation range R (see quantise.py)
    weights: Mapping[str, float]  # aggregator-assigned weight of each member's delta

    @property
    def n(self) -> int:
        return len(self.members)

    def position(self, site: str) -> int:
        """0-based position of ``site`` (its Shamir x is position + 1)."""
        try:
            return self.members.index(site)
        except ValueError:
            raise SecAggError("not_member", f"site {site!r} is not a member of cohort {self.cohort}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "federation": self.federation,
            "cohort": self.cohort,
            "base_version": self.base_version,
            "members": list(self.members),
            "threshold": self.threshold,
            "min_survivors": self.min_survivors,
            "deadline": self.deadline,
            "created_at": self.created_at,
            "clip_range": self.clip_range,
            "weights": dict(sorted(self.weights.items())),
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> CohortAnnouncement:
        """Validate every field (raise ``SecAggError('schema')`` naming it)."""
        what = "cohort announcement"
        members = doc.get("members")
        if not isinstance(members, list) or not 3 <= len(members) <= MAX_MEMBERS:
            raise SecAggError("schema", f"{what} members must be a list of 3..{MAX_MEMBERS} site ids")
        members = [_site(m, "member") for m in members]
        if members != sorted(set(members)):
            raise SecAggError("schema", f"{what} members must be sorted and unique")
        n = len(members)
        t = _int(doc, "threshold", what, 1)
        if not n // 2 < t <= n:
            raise SecAggError("schema", f"{what} threshold {t} must be above n/2 and at most n = {n}")
        min_survivors = _int(doc, "min_survivors", what, 1)
        if not 2 <= min_survivors <= n:
            raise SecAggError("schema", f"{what} min_survivors {min_survivors} must be in 2..{n}")
        clip_range = _num(doc, "clip_range", what)
        if clip_range <= 0:
            raise SecAggError("schema", f"{what} clip_range must be positive")
        weights = doc.get("weights")
        if not isinstance(weights, dict) or sorted(weights) != members:
            raise SecAggError("schema", f"{what} weights must give one weight per member")
        for s, w in weights.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not (0 < w < math.inf):
                raise SecAggError("schema", f"{what} weight of {s!r} must be a positive finite number")
        cohort = doc.get("cohort")
        if (
            not isinstance(cohort, str)
            or not 16 <= len(cohort) <= 64
            or not all(c in "0123456789abcdef" for c in cohort)
        ):
            raise SecAggError("schema", f"{what} cohort id must be 16..64 lowercase hex digits")
        return cls(
            _site(doc.get("federation"), "federation"),
            cohort,
            _int(doc, "base_version", what),
            tuple(members),
            t,
            min_survivors,
            _num(doc, "deadline", what),
            _num(doc, "created_at", what),
            clip_range,
            {s: float(w) for s, w in weights.items()},
        )


def sign_cohort(ann: CohortAnnouncement, aggregator_keys: KeyPair) -> bytes:
    CohortAnnouncement.from_dict(ann.to_dict())  # never sign what a member would refuse
    return envelope.sign_body(_COHORT_MAGIC, _COHORT_DOMAIN, envelope.canonical_json(ann.to_dict()), aggregator_keys)


def open_cohort(blob: bytes, aggregator_sign_pub: bytes, federation: str) -> tuple[CohortAnnouncement, bytes]:
    """Verify a cohort announcement; return it and its cohort hash."""
    doc = _verify_signed(_COHORT_MAGIC, _COHORT_DOMAIN, "cohort announcement", blob, aggregator_sign_pub, COHORT_FIELDS)
    ann = CohortAnnouncement.from_dict(doc)
    if ann.federation != federation:
        raise SecAggError("federation", f"cohort announcement is for federation {ann.federation!r}, not {federation!r}")
    return ann, blob_hash(bytes(blob))


# --------------------------------------------------------------------------- survivors announcement
SURVIVORS_FIELDS = ("federation", "cohort", "cohort_hash", "survivors", "dropped", "created_at")


@dataclass(frozen=True)
class SurvivorsAnnouncement:
    """After the deadline: who submitted (S) and who did not (D); a partition of the members."""

    federation: str
    cohort: str
    cohort_hash: bytes
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "federation": self.federation,
            "cohort": self.cohort,
            "cohort_hash": self.cohort_hash.hex(),
            "survivors": sorted(self.survivors),
            "dropped": sorted(self.dropped),
            "created_at": self.created_at,
        }

    def check_against(self, ann: CohortAnnouncement, cohort_hash: bytes) -> None:
        """Raise unless this announcement is about ``ann`` and partitions its members."""
        if self.federation != ann.federation:
            raise SecAggError("federation", f"survivors announcement is for federation {self.federation!r}")
        if self.cohort != ann.cohort or self.cohort_hash != cohort_hash:
            raise SecAggError("wrong_cohort", f"survivors announcement is about cohort {self.cohort}, not {ann.cohort}")
        s, d = set(self.survivors), set(self.dropped)
        if s & d or (s | d) != set(ann.members) or len(s) != len(self.survivors) or len(d) != len(self.dropped):
            raise SecAggError("schema", "survivors and dropped must partition the cohort's members")
        if len(s) < max(ann.min_survivors, 2):
            raise SecAggError("too_few", f"{len(s)} survivors, the cohort needs at least {ann.min_survivors}")


def sign_survivors(doc: SurvivorsAnnouncement, aggregator_keys: KeyPair) -> bytes:
    return envelope.sign_body(
        _SURVIVORS_MAGIC, _SURVIVORS_DOMAIN, envelope.canonical_json(doc.to_dict()), aggregator_keys
    )


def open_survivors(blob: bytes, aggregator_sign_pub: bytes) -> tuple[SurvivorsAnnouncement, bytes]:
    """Verify a survivors announcement's signature and fields; return it and its hash."""
    what = "survivors announcement"
    doc = _verify_signed(_SURVIVORS_MAGIC, _SURVIVORS_DOMAIN, what, blob, aggregator_sign_pub, SURVIVORS_FIELDS)
    for key in ("survivors", "dropped"):
        if not isinstance(doc[key], list) or len(doc[key]) > MAX_MEMBERS:
            raise SecAggError("schema", f"{what} {key} must be a list of site ids")
    ch = doc["cohort_hash"]
    if not isinstance(ch, str) or len(ch) != 64:
        raise SecAggError("schema", f"{what} cohort_hash must be 64 hex digits")
    try:
        cohort_hash = bytes.fromhex(ch)
    except ValueError:
        raise SecAggError("schema", f"{what} cohort_hash must be 64 hex digits") from None
    if not isinstance(doc["cohort"], str):
        raise SecAggError("schema", f"{what} cohort must be a string")
    out = SurvivorsAnnouncement(
        _site(doc["federation"], "federation"),
        doc["cohort"],
        cohort_hash,
        tuple(_site(s, "survivor") for s in doc["survivors"]),
        tuple(_site(s, "dropped site") for s in doc["dropped"]),
        _num(doc, "created_at", what),
    )
    return out, blob_hash(bytes(blob))


# --------------------------------------------------------------------------- acks (consistency check)
def _ack_digest(federation: str, cohort: str, survivors_hash: bytes) -> bytes:
    return envelope.digest(survivors_hash, _ACK_DOMAIN, federation.encode(), b"\x00", cohort.encode())


def sign_ack(keys: KeyPair, federation: str, cohort: str, survivors_hash: bytes) -> bytes:
    """A member's signature that it saw (and will answer only) this survivors announcement."""
    return keys.signing_key.sign(_ack_digest(federation, cohort, survivors_hash)).signature


def ack_is_valid(sign_pub: bytes, sig: bytes, federation: str, cohort: str, survivors_hash: bytes) -> bool:
    try:
        VerifyKey(sign_pub).verify(_ack_digest(federation, cohort, survivors_hash), sig)
        return True
    except (BadSignatureError, ValueError, TypeError):
        return False


# --------------------------------------------------------------------------- share bundles
def _field(s: str) -> bytes:
    raw = s.encode("utf-8")
    return bytes([len(raw)]) + raw


def leaf(cohort_hash: bytes, dealer: str, recipient: str, slot: int, share: int) -> bytes:
    """Commitment to one share. Shares are uniform field elements, so it hides them."""
    return leaf_from(leaf_base(cohort_hash, dealer, recipient), slot, share)


def leaf_base(cohort_hash: bytes, dealer: str, recipient: str) -> Any:
    """The hash state of one (dealer, recipient) bundle's prefix: copied per share (the hot path)."""
    return hashlib.blake2b(cohort_hash + _field(dealer) + _field(recipient), digest_size=32, person=b"fedline-sa-leaf")


def leaf_from(base: Any, slot: int, share: int) -> bytes:
    """The leaf of ``slot`` from its bundle's :func:`leaf_base`."""
    h = base.copy()
    h.update(slot.to_bytes(2, "big") + share.to_bytes(shamir.SHARE_BYTES, "big"))
    return bytes(h.digest())


def leaves(cohort_hash: bytes, dealer: str, recipient: str, shares: list[int], first_slot: int = 0) -> list[bytes]:
    """The leaves of consecutive slots."""
    base = leaf_base(cohort_hash, dealer, recipient)
    return [leaf_from(base, slot, share) for slot, share in enumerate(shares, first_slot)]


def root(leaves: list[bytes]) -> bytes:
    """The dealer's commitment to one recipient's bundle: hash of its n leaves in slot order."""
    return hashlib.blake2b(b"".join(leaves), digest_size=32, person=b"fedline-sa-root").digest()


def seal_bundle(
    dealer_keys: KeyPair, recipient_box_pub: bytes, cohort_hash: bytes, recipient: str, shares: list[int]
) -> bytes:
    """Sign the shares dealt to one recipient with the dealer's key, seal them to the recipient."""
    plain = b"".join(
        [
            _BUNDLE_MAGIC,
            cohort_hash,
            _field(dealer_keys.ident),
            _field(recipient),
            len(shares).to_bytes(2, "big"),
            *(shamir.to_bytes(y) for y in shares),
        ]
    )
    sig = dealer_keys.signing_key.sign(envelope.digest(plain, _BUNDLE_DOMAIN)).signature
    return SealedBox(PublicKey(recipient_box_pub)).encrypt(sig + plain)


def open_bundle(
    blob: bytes, own_keys: KeyPair, enrollment: Enrollment, cohort_hash: bytes, dealer: str, n: int
) -> list[int]:
    """Open a bundle addressed to us by ``dealer`` in the cohort ``cohort_hash``; its n shares."""
    try:
        inner = SealedBox(own_keys.box_key).decrypt(bytes(blob))
    except (CryptoError, ValueError, TypeError):
        raise SecAggError("schema", f"bundle from {dealer!r} does not open with this site's key") from None
    sig, plain = inner[:64], inner[64:]
    _verify_site(enrollment, dealer, _BUNDLE_DOMAIN, plain, sig, "bundle")
    head = 4 + 32
    if len(plain) < head + 2 or plain[:4] != _BUNDLE_MAGIC:
        raise SecAggError("schema", f"bundle from {dealer!r} is malformed")
    if plain[4:head] != cohort_hash:
        raise SecAggError("wrong_cohort", f"bundle from {dealer!r} belongs to another cohort")
    pos = head
    names = []
    for _ in range(2):
        ln = plain[pos]
        names.append(plain[pos + 1 : pos + 1 + ln].decode("utf-8", errors="replace"))
        pos += 1 + ln
    if names != [dealer, own_keys.ident]:
        raise SecAggError(
            "not_member", f"bundle is from {names[0]!r} to {names[1]!r}, not from {dealer!r} to {own_keys.ident!r}"
        )
    count = int.from_bytes(plain[pos : pos + 2], "big")
    body = plain[pos + 2 :]
    if count != n or len(body) != n * shamir.SHARE_BYTES:
        raise SecAggError("schema", f"bundle from {dealer!r} has {count} shares, the cohort has {n} members")
    try:
        return [shamir.from_bytes(body[i : i + shamir.SHARE_BYTES]) for i in range(0, len(body), shamir.SHARE_BYTES)]
    except ValueError as exc:
        raise SecAggError("schema", f"bundle from {dealer!r}: {exc}") from None


# --------------------------------------------------------------------------- masked submission
@dataclass(frozen=True)
class MaskedSubmission:
    """What a member's one update carries: the masked vector, its sealed bundles and their roots.

    Rides inside the site's normal signed+sealed update, so the aggregator knows the dealer and
    that the roots are the dealer's own.
    """

    cohort: str
    cohort_hash: bytes
    site: str
    masked: np.ndarray  # uint32, the flattened weighted delta plus masks, mod 2^32
    bundles: Mapping[str, bytes]  # recipient -> sealed bundle
    roots: Mapping[str, bytes]  # recipient -> root of that bundle's leaves
    clamped: int = 0  # coordinates clamped to the quantisation range (a too-large delta)

    def encode(self) -> bytes:
        order = sorted(self.bundles)
        meta = {
            "cohort": self.cohort,
            "cohort_hash": self.cohort_hash.hex(),
            "site": self.site,
            "length": int(self.masked.size),
            "clamped": self.clamped,
            "bundles": [[k, len(self.bundles[k]), self.roots[k].hex()] for k in order],
        }
        head = envelope.canonical_json(meta)
        return b"".join(
            [
                _SUBMISSION_MAGIC,
                _U32.pack(len(head)),
                head,
                *(self.bundles[k] for k in order),
                np.ascontiguousarray(self.masked, dtype="<u4").tobytes(),
            ]
        )

    @classmethod
    def decode(cls, blob: bytes | memoryview) -> MaskedSubmission:
        view = memoryview(blob)
        if len(view) < 8 or bytes(view[:4]) != _SUBMISSION_MAGIC:
            raise SecAggError("schema", "not a masked submission (no FLQ1 magic)")
        (hlen,) = _U32.unpack_from(view, 4)
        if 8 + hlen > len(view) or hlen > envelope.MAX_HEADER_BYTES:
            raise SecAggError("schema", "masked submission header does not fit")
        try:
            meta = json.loads(bytes(view[8 : 8 + hlen]))
        except ValueError:
            raise SecAggError("schema", "masked submission header is not JSON") from None
        if not isinstance(meta, dict) or set(meta) != {"cohort", "cohort_hash", "site", "length", "clamped", "bundles"}:
            raise SecAggError("schema", "masked submission header has the wrong fields")
        length, clamped = _int(meta, "length", "submission"), _int(meta, "clamped", "submission")
        entries = meta["bundles"]
        if not isinstance(entries, list) or len(entries) > MAX_MEMBERS:
            raise SecAggError("schema", "masked submission bundles must be a list")
        pos, bundles, roots = 8 + hlen, {}, {}
        for e in entries:
            if (
                not isinstance(e, list)
                or len(e) != 3
                or not isinstance(e[1], int)
                or not 0 < e[1] < 65536
                or not isinstance(e[2], str)
                or len(e[2]) != 64
            ):
                raise SecAggError("schema", "masked submission bundle entry must be [site, size, root]")
            k = _site(e[0], "bundle recipient")
            if k in bundles or pos + e[1] > len(view):
                raise SecAggError("schema", f"bundle for {k!r} is duplicated or does not fit")
            bundles[k] = bytes(view[pos : pos + e[1]])
            roots[k] = bytes.fromhex(e[2])
            pos += e[1]
        if len(view) - pos != 4 * length:
            raise SecAggError("schema", f"masked vector is {len(view) - pos} bytes, header says {length} values")
        ch = meta["cohort_hash"]
        if not isinstance(ch, str) or len(ch) != 64 or not isinstance(meta["cohort"], str):
            raise SecAggError("schema", "masked submission cohort fields are malformed")
        return cls(
            meta["cohort"],
            bytes.fromhex(ch),
            _site(meta["site"], "site"),
            np.frombuffer(view, dtype="<u4", count=length, offset=pos),
            bundles,
            roots,
            clamped,
        )


# --------------------------------------------------------------------------- unmask request and answer
@dataclass(frozen=True)
class UnmaskRequest:
    """Aggregator -> one member: the survivors announcement, >= t acks of it, and the bundles
    the survivors dealt to this member. Needs no signature of its own: every part is signed.
    Sealed to the member (:meth:`seal`), because its clear parts name the survivors and the acks."""

    survivors_blob: bytes
    acks: Mapping[str, bytes]
    bundles: Mapping[str, bytes]  # dealer -> sealed bundle addressed to this member

    def encode(self) -> bytes:
        return envelope.canonical_json(
            {
                "survivors": _b64(self.survivors_blob),
                "acks": {k: _b64(v) for k, v in sorted(self.acks.items())},
                "bundles": {k: _b64(v) for k, v in sorted(self.bundles.items())},
            }
        )

    def seal(self, member_box_pub: bytes) -> bytes:
        """``FLP | ver | SealedBox(member's X25519 key, encode())``: only that member reads it."""
        return (
            _REQUEST_MAGIC
            + bytes([envelope.FORMAT_VERSION])
            + SealedBox(PublicKey(member_box_pub)).encrypt(self.encode())
        )

    @classmethod
    def open(cls, blob: bytes | memoryview, member_keys: KeyPair) -> UnmaskRequest:
        """Open a request sealed to this member (:meth:`seal`) and decode it."""
        if len(blob) < 4 + 48 or bytes(blob[:3]) != _REQUEST_MAGIC or blob[3] != envelope.FORMAT_VERSION:
            raise SecAggError("schema", "not a sealed unmask request (no FLP magic or another version)")
        try:
            raw = SealedBox(member_keys.box_key).decrypt(bytes(blob[4:]))
        except CryptoError:
            raise SecAggError("schema", f"unmask request is not sealed to {member_keys.ident!r}") from None
        return cls.decode(raw)

    @classmethod
    def decode(cls, raw: bytes) -> UnmaskRequest:
        try:
            doc = json.loads(raw)
        except ValueError:
            raise SecAggError("schema", "unmask request is not JSON") from None
        if not isinstance(doc, dict) or set(doc) != {"survivors", "acks", "bundles"}:
            raise SecAggError("schema", "unmask request must have survivors, acks, bundles")
        if not isinstance(doc["acks"], dict) or not isinstance(doc["bundles"], dict):
            raise SecAggError("schema", "unmask request acks and bundles must be objects")
        return cls(
            _unb64(doc["survivors"], "survivors"),
            {_site(k, "ack signer"): _unb64(v, "ack", 64) for k, v in doc["acks"].items()},
            {_site(k, "dealer"): _unb64(v, "bundle") for k, v in doc["bundles"].items()},
        )


@dataclass(frozen=True)
class Answer:
    """One member's shares for the aggregator, after the consistency check passed."""

    federation: str
    cohort: str
    survivors_hash: bytes
    site: str
    self_shares: Mapping[str, int] = field(default_factory=dict)  # dealer in S -> share of b_dealer
    pair_shares: Mapping[str, Mapping[str, int]] = field(
        default_factory=dict
    )  # dealer in S -> {j in D: share of s_dealer,j}
    leaves: Mapping[str, list[bytes]] = field(default_factory=dict)  # dealer -> the n leaves of its bundle
    refused: Mapping[str, str] = field(default_factory=dict)  # dealer -> reason its bundle was refused

    def encode(self) -> bytes:
        return envelope.canonical_json(
            {
                "federation": self.federation,
                "cohort": self.cohort,
                "survivors_hash": self.survivors_hash.hex(),
                "site": self.site,
                "self_shares": {k: hex(v) for k, v in self.self_shares.items()},
                "pair_shares": {k: {j: hex(v) for j, v in d.items()} for k, d in self.pair_shares.items()},
                "leaves": {k: [x.hex() for x in v] for k, v in self.leaves.items()},
                "refused": dict(self.refused),
            }
        )

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> Answer:
        try:
            doc = json.loads(bytes(raw))
        except ValueError:
            raise SecAggError("schema", "answer is not JSON") from None
        keys = {"federation", "cohort", "survivors_hash", "site", "self_shares", "pair_shares", "leaves", "refused"}
        if not isinstance(doc, dict) or set(doc) != keys:
            raise SecAggError("schema", "answer has the wrong fields")

        def share(v: Any) -> int:
            try:
                y = int(v, 16)
            except (TypeError, ValueError):
                raise SecAggError("schema", f"share {v!r} is not hex") from None
            if not 0 <= y < shamir.PRIME:
                raise SecAggError("schema", "share is not a field element")
            return y

        def hexes(v: Any) -> list[bytes]:
            # one join and one fromhex per dealer (n^2 leaves per cohort: this is the aggregator's hot path)
            try:
                if not isinstance(v, list) or len(v) > MAX_MEMBERS or set(map(len, v)) - {64}:
                    raise TypeError
                raw = bytes.fromhex("".join(v))
            except TypeError:
                raise SecAggError("schema", "leaves must be a list of 64-hex-digit strings") from None
            except ValueError:
                raise SecAggError("schema", "leaves must be hex") from None
            return [raw[i : i + 32] for i in range(0, len(raw), 32)]

        valid: set[str] = set()

        def name(v: Any, what: str) -> str:  # each member's name is checked once, not once per share
            if v not in valid:
                valid.add(_site(v, what))
            return str(v)

        for key in ("self_shares", "pair_shares", "leaves", "refused"):
            if not isinstance(doc[key], dict):
                raise SecAggError("schema", f"answer {key} must be an object")
        try:
            sh = bytes.fromhex(doc["survivors_hash"])
        except (TypeError, ValueError):
            raise SecAggError("schema", "answer survivors_hash is not hex") from None
        pair = {}
        for k, d in doc["pair_shares"].items():
            if not isinstance(d, dict):
                raise SecAggError("schema", "answer pair_shares entries must be objects")
            pair[name(k, "dealer")] = {name(j, "dropped site"): share(v) for j, v in d.items()}
        if not isinstance(doc["cohort"], str) or not isinstance(doc["federation"], str):
            raise SecAggError("schema", "answer cohort and federation must be strings")
        return cls(
            doc["federation"],
            doc["cohort"],
            sh,
            _site(doc["site"], "site"),
            {name(k, "dealer"): share(v) for k, v in doc["self_shares"].items()},
            pair,
            {name(k, "dealer"): hexes(v) for k, v in doc["leaves"].items()},
            {name(k, "dealer"): str(v)[:200] for k, v in doc["refused"].items()},
        )


# --------------------------------------------------------------------------- member replies on the wire
_REPLY_MAGIC, _REPLY_DOMAIN = b"FLY", b"fedline-secagg-reply-v1\x00"
REPLY_KINDS = ("ack", "answer")


def seal_reply(kind: str, cohort: str, body: bytes, site_keys: KeyPair, aggregator_box_pub: bytes) -> bytes:
    """A member's ack or answer: signed by the site, sealed to the aggregator (like an update)."""
    if kind not in REPLY_KINDS:
        raise ValueError(f"reply kind must be one of {REPLY_KINDS}")
    head = envelope.canonical_json({"kind": kind, "cohort": cohort, "site": site_keys.ident})
    plain = _U32.pack(len(head)) + head + body
    sig = site_keys.signing_key.sign(envelope.digest(plain, _REPLY_DOMAIN)).signature
    return (
        _REPLY_MAGIC + bytes([envelope.FORMAT_VERSION]) + SealedBox(PublicKey(aggregator_box_pub)).encrypt(sig + plain)
    )


def open_reply(blob: bytes, aggregator_keys: KeyPair, enrollment: Enrollment) -> tuple[str, str, str, bytes]:
    """Open and verify a member's reply: (site, kind, cohort, body)."""
    if len(blob) < 4 + 48 or blob[:3] != _REPLY_MAGIC or blob[3] != envelope.FORMAT_VERSION:
        raise SecAggError("schema", "not a secure-aggregation reply (no FLY magic or another version)")
    try:
        inner = SealedBox(aggregator_keys.box_key).decrypt(bytes(blob[4:]))
    except CryptoError:
        raise SecAggError("schema", "reply does not open with this aggregator's key") from None
    sig, plain = inner[:64], inner[64:]
    if len(plain) < 4:
        raise SecAggError("schema", "reply is truncated")
    (hlen,) = _U32.unpack_from(plain, 0)
    if 4 + hlen > len(plain):
        raise SecAggError("schema", "reply header does not fit")
    try:
        head = json.loads(plain[4 : 4 + hlen])
    except ValueError:
        raise SecAggError("schema", "reply header is not JSON") from None
    if not isinstance(head, dict) or set(head) != {"kind", "cohort", "site"} or head["kind"] not in REPLY_KINDS:
        raise SecAggError("schema", "reply header must have kind (ack|answer), cohort, site")
    site = _site(head["site"], "site")
    _verify_site(enrollment, site, _REPLY_DOMAIN, plain, sig, "reply")
    if not isinstance(head["cohort"], str):
        raise SecAggError("schema", "reply cohort must be a string")
    return site, head["kind"], head["cohort"], bytes(plain[4 + hlen :])
