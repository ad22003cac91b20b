"""Signed line commands (``broker_bridge.line_command``): who may command a line, and replays."""

from __future__ import annotations

import pytest

from broker_bridge.errors import WireError
from broker_bridge.keys import KeyPair
from broker_bridge.line_command import CommandVerifier, sign_command

SITE = KeyPair.generate("site", "press-3")
AGG = KeyPair.generate("aggregator", "aggregator")
NOW = 1_800_000_000.0


def verifier() -> CommandVerifier:
    return CommandVerifier(
        {"site": bytes(SITE.signing_key.verify_key), "aggregator": bytes(AGG.signing_key.verify_key)},
        "plant",
        "press-3",
    )


def test_site_and_aggregator_may_sign_and_each_command_counts_once() -> None:
    v = verifier()
    signer, doc = v.verify(sign_command("rollback", "plant", "press-3", SITE, issued_at=NOW), now=NOW + 1)
    assert signer == "site" and doc["command"] == "rollback"
    by_agg = sign_command("rollback", "plant", "press-3", AGG, issued_at=NOW + 2)
    assert v.verify(by_agg, now=NOW + 3)[0] == "aggregator"
    with pytest.raises(WireError) as exc:  # the same signed bytes again
        v.verify(by_agg, now=NOW + 4)
    assert exc.value.reason == "replay"


@pytest.mark.parametrize(
    "blob, reason",
    [
        (b"rollback", "framing"),
        (b'{"command": "rollback"}', "framing"),
        (sign_command("rollback", "plant", "press-3", KeyPair.generate("site", "press-3"), issued_at=NOW), "signature"),
        (sign_command("rollback", "plant", "press-4", SITE, issued_at=NOW), "schema"),
        (sign_command("rollback", "other", "press-3", SITE, issued_at=NOW), "schema"),
        (sign_command("rollback", "plant", "press-3", SITE, issued_at=NOW - 301), "replay"),
        (sign_command("rollback", "plant", "press-3", SITE, issued_at=NOW + 61), "replay"),
    ],
)
def test_refused_commands_name_the_reason(blob: bytes, reason: str) -> None:
    with pytest.raises(WireError) as exc:
        verifier().verify(blob, now=NOW)
    assert exc.value.reason == reason


def test_only_known_commands_are_signed() -> None:
    with pytest.raises(ValueError, match="not one of"):
        sign_command("reboot", "plant", "press-3", SITE)
