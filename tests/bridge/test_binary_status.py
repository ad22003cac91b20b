"""The binary status (FLH1): hand-built bytes, the one reader every consumer uses (JSON or binary), and what
it refuses; the aggregator's catch-up and format choice read it as they read JSON."""

from __future__ import annotations

import json
import struct

import pytest

from broker_bridge import binhead
from broker_bridge.errors import WireError
from edge.status_doc import build_status
from tests.edge.test_follow_flt2 import _service

PRIVACY = {
    "privacy": "on",
    "accounting": "per_record",
    "epsilon": 1.5,
    "epsilon_budget": 8.0,
    "delta": 1e-05,
    "privacy_unit": "row",
}
DOC = {"state": "online", "version": 7, "epoch": 1, "reads": ["FLT2", "FLM3"], "ts": 1.5e9}
# keys: state 0, version 1, epoch 2, reads 12, ts 13; strings: online 0, FLT2 12, FLM3 15
BODY = (
    b"FLH1\x05"
    + b"\x00\x04\x00"
    + b"\x01\x05\x07"
    + b"\x02\x05\x01"
    + b"\x0c\x07\x02\x04\x0c\x04\x0f"
    + b"\x0d\x01"
    + struct.pack("<d", 1.5e9)
)


def test_a_hand_built_status_is_what_the_encoder_writes() -> None:
    assert binhead.pack_status(DOC) == BODY
    assert binhead.read_status(BODY) == DOC


def test_a_real_status_round_trips_in_about_a_third_of_its_json() -> None:
    doc = build_status(
        state="online",
        version=12,
        privacy=PRIVACY,
        publishing="ok",
        outbox_depth=3,
        epoch=2,
        model_refused={"version": 11, "reason": "step"},
        reads=("FLT2", "FLR2", "FLM2", "FLM3"),
    )
    packed = binhead.pack_status(doc)
    assert packed is not None and binhead.read_status(packed) == doc
    as_json = json.dumps(doc, separators=(",", ":")).encode()
    assert binhead.read_status(as_json) == doc
    assert len(packed) * 2 < len(as_json)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"garbage",
        b"[1, 2]",  # JSON, not an object
        b"[" * 100_000,  # a JSON bomb: RecursionError inside json, caught
        b"\xff\xfe",
        BODY + b"\x00",  # a byte after the last field
        BODY[:-3],  # truncated
        b"FLH1\x01\x00\x10",  # an unknown tag
        b"FLH1\x01\x00\x04\x63",  # a string index out of the list
        b"FLH1" + b"\x00" * binhead.MAX_STATUS_BYTES,  # over the size cap
    ],
    ids=["empty", "garbage", "list", "json-bomb", "not-utf8", "trailing", "truncated", "tag", "string", "oversize"],
)
def test_what_is_not_a_status_reads_as_none(payload: bytes) -> None:
    assert binhead.read_status(payload) is None


def test_the_binary_decoder_names_what_is_wrong() -> None:
    with pytest.raises(WireError, match="binary status: 1 bytes after its last field"):
        binhead.unpack_status(memoryview(BODY + b"\x00"))
    with pytest.raises(WireError, match="binary status is truncated in field 'ts'"):
        binhead.unpack_status(memoryview(BODY[:-3]))
    with pytest.raises(WireError, match=f"at most {binhead.MAX_STATUS_BYTES}"):
        binhead.unpack_status(memoryview(b"FLH1" + b"\x00" * binhead.MAX_STATUS_BYTES))


def test_a_will_and_a_status_the_format_cannot_hold_stay_json() -> None:
    assert binhead.read_status(b'{"state":"offline","reason":"connection lost"}') == {
        "state": "offline",
        "reason": "connection lost",
    }
    assert binhead.pack_status({**DOC, "note": "x" * 300}) is None


def test_the_aggregator_reads_binary_statuses_for_its_format_choice() -> None:
    agg = _service(["a", "b"])
    agg._on_status("a", binhead.pack_status({**DOC, "reads": ["FLT2", "FLR2", "FLM2", "FLM3", "FLR3"]}))  # type: ignore[arg-type]
    agg._on_status("b", json.dumps({**DOC, "reads": ["FLT2", "FLR2", "FLM2", "FLM3", "FLR3"]}).encode())
    assert agg._all_read("FLM3")
    agg._on_status("b", b"FLH1\x01\x00\x10")  # malformed: ignored, what b said before stands
    assert agg._all_read("FLM3")
