"""Lost data directory: a site asks the aggregator what it already accepted from it (issue 14).

Why: a site's update counter and privacy ledger live in its data directory. If
that is lost (a new disk, a re-imaged gateway), a site that simply started
again would restart its ε at 0 (a false guarantee) and its counters at 1 (every
update refused as a replay). So a site that starts from an empty state first
asks the aggregator, and publishes nothing until it has the answer.

Wire (both JSON bodies framed and signed with :func:`broker_bridge.envelope.sign_body`):

```
request = FLV | ver | SealedBox(aggregator X25519 key, FLW | ver | site signature | {"federation","site","nonce","issued_at"})
answer  = FLB | ver | SealedBox(site X25519 key,       FLA | ver | aggregator signature | {"federation","site","nonce",
                      "last_counter","epsilon","releases","history","answered_at"})
history = [[sample_rate, noise_multiplier, steps, unit_group, count], ...]   (the releases the aggregator read)
```

Who can forge or replay: the request is signed by the site's enrolled key
(checked against the key enrolled for the topic's site), so nobody else can
ask on a site's behalf; a replayed request only makes the aggregator answer
again, sealed to the site, and answers are rate-limited per site. The answer
is signed by the aggregator and carries the site's fresh random nonce, so an
old answer (with an older counter) replayed by the broker is refused. Both are
sealed: the broker learns only that a site is recovering (the topic), never its
counter, its ε or its cadence, which a competitor would read as plant activity.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import PublicKey, SealedBox

from broker_bridge.envelope import FORMAT_VERSION, MAX_HEADER_BYTES, canonical_json, sign_body, verify_body
from broker_bridge.errors import WireError
from broker_bridge.keys import Enrollment, KeyPair

_REQ_SEALED, _REQ_SIGNED, _REQ_DOMAIN = b"FLV", b"FLW", b"fedline-recovery-request-v1\x00"
_ANS_SEALED, _ANS_SIGNED, _ANS_DOMAIN = b"FLB", b"FLA", b"fedline-recovery-answer-v1\x00"
REQUEST_FIELDS = ("federation", "site", "nonce", "issued_at")
ANSWER_FIELDS = ("federation", "site", "nonce", "last_counter", "epsilon", "releases", "history", "answered_at")


@dataclass(frozen=True)
class RecoveryAnswer:
    """What the aggregator accepted from one site: its highest counter and the privacy it read."""

    site: str
    nonce: str
    last_counter: int  # highest counter the aggregator decided or read for this site (0: none)
    epsilon: float  # the largest per-record ε any of the site's update headers claimed
    releases: int  # updates with a readable header
    history: list[tuple[float, float, int, int, int]]  # (sample_rate, sigma, steps, unit_group, count)


def _seal(magic: bytes, box_pub: bytes, inner: bytes) -> bytes:
    return magic + bytes([FORMAT_VERSION]) + SealedBox(PublicKey(box_pub)).encrypt(inner)


def _unseal(magic: bytes, what: str, blob: bytes | memoryview, keys: KeyPair) -> bytes:
    view = memoryview(blob)
    if len(view) < 4 + 48 or len(view) > MAX_HEADER_BYTES * 4:
        raise WireError("framing", f"{len(view)} bytes is not the size of a {what}")
    if bytes(view[:3]) != magic:
        raise WireError("framing", f"not a {what} (no {magic.decode()} magic)")
    if view[3] != FORMAT_VERSION:
        raise WireError("version", f"{what} format {view[3]}, this build reads {FORMAT_VERSION}")
    try:
        return SealedBox(keys.box_key).decrypt(bytes(view[4:]))
    except CryptoError:
        raise WireError("decrypt", f"{what} is not sealed to {keys.role} {keys.ident!r}") from None


def new_nonce() -> str:
    return secrets.token_hex(16)


def seal_request(federation: str, nonce: str, site_keys: KeyPair, aggregator_box_pub: bytes) -> bytes:
    """The site's request, signed with its key and sealed to the aggregator."""
    doc = {"federation": federation, "site": site_keys.ident, "nonce": nonce, "issued_at": round(time.time(), 3)}
    return _seal(_REQ_SEALED, aggregator_box_pub, sign_body(_REQ_SIGNED, _REQ_DOMAIN, canonical_json(doc), site_keys))


def open_request(blob: bytes | memoryview, topic_site: str, aggregator_keys: KeyPair, enrollment: Enrollment) -> str:
    """The nonce of a request from ``topic_site``; :class:`WireError` unless that enrolled site signed it."""
    inner = _unseal(_REQ_SEALED, "recovery request", blob, aggregator_keys)
    enrolled = enrollment.sites.get(topic_site)
    if enrolled is None:
        raise WireError("unenrolled", f"site {topic_site!r} is not enrolled in federation {enrollment.federation!r}")
    try:
        doc = verify_body(_REQ_SIGNED, _REQ_DOMAIN, "recovery request", inner, enrolled.sign_pub, REQUEST_FIELDS)
    except WireError as exc:
        if exc.reason == "signature":  # verify_body speaks of the aggregator's key; here it is the site's
            raise WireError("signature", f"recovery request is not signed by {topic_site!r}'s enrolled key") from None
        raise
    if doc["site"] != topic_site or doc["federation"] != enrollment.federation:
        raise WireError("schema", f"request names site {doc['site']!r} of {doc['federation']!r}")
    nonce = doc["nonce"]
    if not isinstance(nonce, str) or not 16 <= len(nonce) <= 64:
        raise WireError("schema", "request nonce must be a string of 16-64 characters")
    return nonce


def seal_answer(answer: RecoveryAnswer, federation: str, aggregator_keys: KeyPair, site_box_pub: bytes) -> bytes:
    """The aggregator's answer, signed and sealed to the site (it tells the site's counter and ε)."""
    doc = {
        "federation": federation,
        "site": answer.site,
        "nonce": answer.nonce,
        "last_counter": answer.last_counter,
        "epsilon": answer.epsilon,
        "releases": answer.releases,
        "history": [list(h) for h in answer.history],
        "answered_at": round(time.time(), 3),
    }
    signed = sign_body(_ANS_SIGNED, _ANS_DOMAIN, canonical_json(doc), aggregator_keys)
    return _seal(_ANS_SEALED, site_box_pub, signed)


def open_answer(
    blob: bytes | memoryview, site_keys: KeyPair, aggregator_sign_pub: bytes, federation: str, nonce: str
) -> RecoveryAnswer:
    """Open and check an answer to this site's request with ``nonce`` (:class:`WireError` naming what is wrong)."""
    inner = _unseal(_ANS_SEALED, "recovery answer", blob, site_keys)
    doc = verify_body(_ANS_SIGNED, _ANS_DOMAIN, "recovery answer", inner, aggregator_sign_pub, ANSWER_FIELDS)
    if doc["site"] != site_keys.ident or doc["federation"] != federation:
        raise WireError("schema", f"answer is for site {doc['site']!r} of {doc['federation']!r}")
    if doc["nonce"] != nonce:
        raise WireError("replay", "answer carries another nonce than this site's request (an old answer?)")
    return RecoveryAnswer(
        site=doc["site"],
        nonce=nonce,
        last_counter=_count(doc, "last_counter"),
        epsilon=_eps(doc["epsilon"]),
        releases=_count(doc, "releases"),
        history=_history(doc["history"]),
    )


def _count(doc: Mapping[str, Any], key: str) -> int:
    v = doc[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise WireError("schema", f"answer {key} must be a non-negative integer, got {v!r}")
    return v


def _eps(v: Any) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        raise WireError("schema", f"answer epsilon must be a finite number >= 0, got {v!r}")
    return float(v)


def _history(items: Any) -> list[tuple[float, float, int, int, int]]:
    if not isinstance(items, list) or len(items) > 10_000:
        raise WireError("schema", "answer history must be a list of at most 10,000 entries")
    out = []
    for h in items:
        if not isinstance(h, list) or len(h) != 5:
            raise WireError("schema", "answer history entries are [sample_rate, sigma, steps, unit_group, count]")
        q, sigma, steps, group, count = h
        nums_ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (q, sigma))
        ints_ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (steps, group, count))
        if not (nums_ok and ints_ok and 0 < q <= 1 and sigma > 0 and steps >= 0 and group >= 1 and count >= 1):
            raise WireError("schema", f"answer history entry {h!r} is out of range")
        out.append((float(q), float(sigma), int(steps), int(group), int(count)))
    return out
