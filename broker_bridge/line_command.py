"""Signed commands to a line's inference service (today: ``rollback``).

Why signed: the command topic is on the plant's broker, where every client
that may publish there could otherwise swap the model a line serves. A
command counts only when signed by the site's Ed25519 key or the
aggregator's; anything else is refused and counted by the line.

Wire: ``FLD | ver | signature | canonical JSON``, the JSON being
``{"command", "federation", "site", "issued_at", "nonce"}``; signature over a
domain-separated digest (``envelope.sign_body``). Replay: a line takes a
command only if it was issued within ``max_age_s`` (default 5 minutes, clocks
within a minute of each other) and later than the last one it took.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from typing import Any

from broker_bridge.envelope import canonical_json, sign_body, verify_body
from broker_bridge.errors import WireError
from broker_bridge.keys import KeyPair

COMMANDS = ("rollback",)
_MAGIC = b"FLD"
_DOMAIN = b"fedline-line-command-v1\x00"
_FIELDS = ("command", "federation", "site", "issued_at", "nonce")


def sign_command(command: str, federation: str, site: str, keys: KeyPair, issued_at: float | None = None) -> bytes:
    """A command for the lines of ``site``, signed by ``keys`` (the site's or the aggregator's)."""
    if command not in COMMANDS:
        raise ValueError(f"command {command!r} is not one of {COMMANDS}")
    doc = {
        "command": command,
        "federation": federation,
        "site": site,
        "issued_at": round(time.time() if issued_at is None else issued_at, 3),
        "nonce": secrets.token_hex(8),
    }
    return sign_body(_MAGIC, _DOMAIN, canonical_json(doc), keys)


class CommandVerifier:
    """Checks commands for one line: signer, federation, site, freshness, order."""

    def __init__(
        self,
        signers: Mapping[str, bytes],
        federation: str,
        site: str,
        max_age_s: float = 300.0,
        max_skew_s: float = 60.0,
    ) -> None:
        if not signers:
            raise ValueError("a command verifier needs at least one signer's public key")
        self.signers = dict(signers)  # who -> Ed25519 verify key
        self.federation = federation
        self.site = site
        self.max_age_s = max_age_s
        self.max_skew_s = max_skew_s
        self.last_issued_at = float("-inf")

    def verify(self, blob: bytes, now: float | None = None) -> tuple[str, dict[str, Any]]:
        """``(signer, command doc)`` or :class:`WireError` naming the first check that fails."""
        doc = None
        signer = ""
        for who, pub in self.signers.items():
            try:
                doc = verify_body(_MAGIC, _DOMAIN, "line command", blob, pub, _FIELDS)
                signer = who
                break
            except WireError as exc:
                if exc.reason != "signature":
                    raise
        if doc is None:
            raise WireError("signature", f"line command is not signed by {' or '.join(self.signers)}")
        if doc["command"] not in COMMANDS:
            raise WireError("schema", f"command {doc['command']!r} is not one of {COMMANDS}")
        if doc["federation"] != self.federation or doc["site"] != self.site:
            raise WireError("schema", f"command is for site {doc['site']!r} of {doc['federation']!r}")
        issued = doc["issued_at"]
        if not isinstance(issued, (int, float)) or isinstance(issued, bool):
            raise WireError("schema", "command issued_at must be a number")
        now = time.time() if now is None else now
        if not now - self.max_age_s <= issued <= now + self.max_skew_s:
            raise WireError("replay", f"command issued at {issued}, outside {self.max_age_s:g} s of now ({now:.0f})")
        if issued <= self.last_issued_at:
            raise WireError("replay", "command is not newer than the last one taken")
        self.last_issued_at = issued
        return signer, doc
