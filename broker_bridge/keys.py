"""Key pairs of sites and of the aggregator, and the federation's enrollment file.

Every party has two NaCl keys: Ed25519 to sign what it sends, X25519 to be
sealed to. Private key files are JSON with base64 fields and must be mode 0600
(like ssh, we refuse a key that others can read: a leaked site key lets anyone
shape the global model). The enrollment file lists the public keys of every
site the aggregator trusts and of the aggregator itself; revoking a site is
deleting its entry.
"""

from __future__ import annotations

import base64
import json
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from broker_bridge.errors import KeyFileError
from broker_bridge.topics import validate_site_id
from fedline.fsutil import atomic_write

ROLES = ("site", "aggregator", "worker")  # worker: an aggregator intake worker (aggregator.intake_worker)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(path: Path, name: str, text: Any, length: int = 32) -> bytes:
    if not isinstance(text, str):
        raise KeyFileError(path, f"field {name!r} must be a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise KeyFileError(path, f"field {name!r} is not valid base64") from None
    if len(raw) != length:
        raise KeyFileError(path, f"field {name!r} must be {length} bytes, got {len(raw)}")
    return raw


def _read_json(path: Path, kind: str) -> dict[str, Any]:
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise KeyFileError(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(path, f"cannot read: {exc}") from None
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge ints, deep nesting
        raise KeyFileError(path, f"not a fedline {kind} file (not JSON: {str(exc)[:200]})") from None
    if not isinstance(doc, dict) or doc.get("fedline") != kind:
        got = doc.get("fedline") if isinstance(doc, dict) else None
        raise KeyFileError(path, f"wrong file type: expected a fedline {kind} file, got {got!r}")
    if doc.get("version") != 1:
        raise KeyFileError(path, f"unsupported {kind} file version {doc.get('version')!r}")
    return doc


def write_private(path: Path, text: str) -> None:
    """Write a private file: mode 0600 from the first byte, atomically."""
    atomic_write(path, text.encode("utf-8"), 0o600)


def write_public(path: Path, text: str) -> None:
    """Write a public file (mode 0644) atomically."""
    atomic_write(path, text.encode("utf-8"), 0o644)


@dataclass(frozen=True)
class PublicKeys:
    """The public half of a party: who it is and how to check and seal to it."""

    ident: str
    role: str
    sign_pub: bytes  # Ed25519 verify key, 32 bytes
    box_pub: bytes  # X25519 public key, 32 bytes

    @property
    def verify_key(self) -> VerifyKey:
        return VerifyKey(self.sign_pub)

    @property
    def box_key(self) -> PublicKey:
        return PublicKey(self.box_pub)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.ident, "role": self.role, "sign_pub": _b64(self.sign_pub), "box_pub": _b64(self.box_pub)}

    @classmethod
    def from_dict(cls, doc: Any, path: Path, where: str = "") -> PublicKeys:
        if not isinstance(doc, dict):
            raise KeyFileError(path, f"{where or 'public key'} must be an object")
        role = doc.get("role", "site")
        if role not in ROLES:
            raise KeyFileError(path, f"{where}role must be one of {ROLES}, got {role!r}")
        try:
            ident = validate_site_id(doc.get("id"), "id")
        except ValueError as exc:
            raise KeyFileError(path, f"{where}{exc}") from None
        return cls(
            ident,
            role,
            _unb64(path, where + "sign_pub", doc.get("sign_pub")),
            _unb64(path, where + "box_pub", doc.get("box_pub")),
        )

    def save(self, path: str | Path) -> None:
        write_public(Path(path), json.dumps({"fedline": "public-key", "version": 1, **self.to_dict()}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PublicKeys:
        p = Path(path)
        return cls.from_dict(_read_json(p, "public-key"), p)


@dataclass(frozen=True)
class KeyPair:
    """A party's private keys. Never leaves the machine it was made on."""

    ident: str
    role: str
    signing_key: SigningKey = field(repr=False)
    box_key: PrivateKey = field(repr=False)

    @classmethod
    def generate(cls, role: str, ident: str) -> KeyPair:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        validate_site_id(ident, "id")
        return cls(ident, role, SigningKey.generate(), PrivateKey.generate())

    def public(self) -> PublicKeys:
        return PublicKeys(self.ident, self.role, bytes(self.signing_key.verify_key), bytes(self.box_key.public_key))

    def save(self, path: str | Path) -> None:
        doc = {
            "fedline": "private-key",
            "version": 1,
            "id": self.ident,
            "role": self.role,
            "sign_seed": _b64(bytes(self.signing_key)),
            "box_secret": _b64(bytes(self.box_key)),
        }
        write_private(Path(path), json.dumps(doc, indent=2) + "\n")

    def opening_key(self) -> OpeningKey:
        """The X25519 secret alone (an aggregator's, for its intake workers): opens, signs nothing."""
        return OpeningKey(self.ident, self.role, bytes(self.signing_key.verify_key), self.box_key)

    @classmethod
    def load(cls, path: str | Path, *, check_mode: bool = True) -> KeyPair:
        p = Path(path)
        ident, role, doc = _read_private(p, "private-key", check_mode)
        return cls(
            ident,
            role,
            SigningKey(_unb64(p, "sign_seed", doc.get("sign_seed"))),
            PrivateKey(_unb64(p, "box_secret", doc.get("box_secret"))),
        )


def _read_private(p: Path, kind: str, check_mode: bool) -> tuple[str, str, dict[str, Any]]:
    """A private file of ``kind``: (id, role, document), refused when others can read it (0600, like ssh)."""
    if check_mode and p.exists():
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o077:
            raise KeyFileError(p, f"permissions {oct(mode)} are too open; a private key must be 0600 (chmod 600 {p})")
    doc = _read_json(p, kind)
    role = doc.get("role")
    if role not in ROLES:
        raise KeyFileError(p, f"role must be one of {ROLES}, got {role!r}")
    try:
        ident = validate_site_id(doc.get("id"), "id")
    except ValueError as exc:
        raise KeyFileError(p, str(exc)) from None
    return ident, str(role), doc


@dataclass(frozen=True)
class OpeningKey:
    """A party's X25519 secret without its signing key: opens what was sealed to it, signs nothing.

    Why: an aggregator's intake workers only open the sites' updates (``aggregator.intake_worker``).
    Given this file (``fedline keys opening-key``) instead of the aggregator's key pair, a compromised
    worker host reads the updates it could read anyway, but cannot sign a model, a receipt or a key
    grant. Its file kind is ``opening-key``, so it is never mistaken for a key pair that can sign.
    """

    ident: str
    role: str
    sign_pub: bytes  # the owner's Ed25519 public key: public() matches the enrollment's entry
    box_key: PrivateKey = field(repr=False)

    def public(self) -> PublicKeys:
        return PublicKeys(self.ident, self.role, self.sign_pub, bytes(self.box_key.public_key))

    def save(self, path: str | Path) -> None:
        doc = {
            "fedline": "opening-key",
            "version": 1,
            "id": self.ident,
            "role": self.role,
            "sign_pub": _b64(self.sign_pub),
            "box_secret": _b64(bytes(self.box_key)),
        }
        write_private(Path(path), json.dumps(doc, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, *, check_mode: bool = True) -> OpeningKey:
        p = Path(path)
        ident, role, doc = _read_private(p, "opening-key", check_mode)
        return cls(
            ident,
            role,
            _unb64(p, "sign_pub", doc.get("sign_pub")),
            PrivateKey(_unb64(p, "box_secret", doc.get("box_secret"))),
        )


@dataclass
class Enrollment:
    """Who belongs to a federation: the aggregator's public keys and each site's."""

    federation: str
    aggregator: PublicKeys
    sites: dict[str, PublicKeys] = field(default_factory=dict)

    def add(self, keys: PublicKeys) -> None:
        if keys.role != "site":
            raise ValueError(f"{keys.ident!r} is a {keys.role} key, not a site key")
        self.sites[keys.ident] = keys

    def revoke(self, site: str) -> None:
        if site not in self.sites:
            raise KeyError(f"site {site!r} is not enrolled")
        del self.sites[site]

    def save(self, path: str | Path) -> None:
        doc = {
            "fedline": "enrollment",
            "version": 1,
            "federation": self.federation,
            "aggregator": self.aggregator.to_dict(),
            "sites": {k: v.to_dict() for k, v in sorted(self.sites.items())},
        }
        write_public(Path(path), json.dumps(doc, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Enrollment:
        p = Path(path)
        doc = _read_json(p, "enrollment")
        try:
            fed = validate_site_id(doc.get("federation"), "federation")
        except ValueError as exc:
            raise KeyFileError(p, str(exc)) from None
        agg = PublicKeys.from_dict(doc.get("aggregator"), p, "aggregator.")
        if agg.role != "aggregator":
            raise KeyFileError(p, "aggregator.role must be 'aggregator'")
        sites_doc = doc.get("sites", {})
        if not isinstance(sites_doc, dict):
            raise KeyFileError(p, "sites must be an object of site id -> public keys")
        sites = {}
        for name, entry in sites_doc.items():
            keys = PublicKeys.from_dict(entry, p, f"sites.{name}.")
            if keys.ident != name:
                raise KeyFileError(p, f"sites.{name}.id is {keys.ident!r}, expected {name!r}")
            sites[name] = keys
        return cls(fed, agg, sites)


@dataclass(frozen=True)
class FederationKeys:
    """A new federation's key pairs and its enrollment (:func:`create_federation`)."""

    aggregator: KeyPair
    sites: dict[str, KeyPair]
    enrollment: Enrollment


def create_federation(federation: str, sites: Iterable[str], keys_dir: str | Path | None = None) -> FederationKeys:
    """Generate the aggregator's and each site's key pair and enroll every site.

    With ``keys_dir``, write them as ``fedline keys new`` and ``fedline keys enroll`` would:
    ``<party>.key`` (0600), ``<party>.pub.json`` and ``enrollment.json``. The one place the demo,
    the fault rig, the benches and the tests make a federation, so they all make the same one.
    """
    agg = KeyPair.generate("aggregator", "aggregator")
    pairs = {s: KeyPair.generate("site", s) for s in sites}
    enrollment = Enrollment(federation, agg.public())
    for kp in pairs.values():
        enrollment.add(kp.public())
    if keys_dir is not None:
        kd = Path(keys_dir)
        for name, kp in [("aggregator", agg), *pairs.items()]:
            kp.save(kd / f"{name}.key")
            kp.public().save(kd / f"{name}.pub.json")
        enrollment.save(kd / "enrollment.json")
    return FederationKeys(agg, pairs, enrollment)
