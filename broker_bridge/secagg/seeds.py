"""Pairwise mask seeds from the enrolled X25519 keys, with no key-exchange round.

``s_ij = BLAKE2b-256(key = X25519(sk_i, pk_j), person = "fedline-sa-pair", data = cohort | i | j)``
with ``i < j``. Both members compute the same seed from their own private key and the other's
enrolled public key. ``cohort`` is the hash of the signed cohort announcement (which holds a
random cohort id, the federation and the member list), so a seed revealed for a dropped member
in one cohort says nothing about any other cohort, and an aggregator cannot make a site reuse
its masks by re-announcing (a site also refuses a replayed announcement).
"""

from __future__ import annotations

import hashlib
import secrets

from nacl.bindings import crypto_scalarmult
from nacl.exceptions import RuntimeError as NaclRuntimeError

_PERSON = b"fedline-sa-pair"


def _field(s: str) -> bytes:
    raw = s.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def pair_seed(own_box_secret: bytes, peer_box_pub: bytes, cohort_hash: bytes, own: str, peer: str) -> bytes:
    """The 32-byte seed of the pair (own, peer) for the cohort whose announcement hashes to ``cohort_hash``."""
    if own == peer:
        raise ValueError("a member has no pairwise seed with itself")
    try:
        shared = crypto_scalarmult(own_box_secret, peer_box_pub)
    except NaclRuntimeError:  # libsodium refuses an all-zero result
        shared = bytes(32)
    if shared == bytes(32):
        raise ValueError(f"peer {peer!r} has a low-order X25519 key")
    a, b = sorted((own, peer))
    return hashlib.blake2b(cohort_hash + _field(a) + _field(b), key=shared, person=_PERSON, digest_size=32).digest()


def self_seed() -> bytes:
    """A fresh self-mask seed b_i for one cohort (never reused)."""
    return secrets.token_bytes(32)
