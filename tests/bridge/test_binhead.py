"""The binary update header (FLU version 2): hand-built bytes, every refusal, and the whole update through it."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from broker_bridge import binhead, envelope, layouts
from broker_bridge.envelope import UpdateHeader
from broker_bridge.errors import WireError
from tests.bridge import helpers as h

FIXED = struct.pack("<QIIdB", 7, 2, 64, 1.0e9, 0)  # counter, base version, samples, created_at, float32
# msg_id "ab"; three privacy fields: mode = "off" (key 0, interned string 1), steps = 3 (key 6, i64),
# "x" = null (a key by name)
BODY = FIXED + b"\x02ab" + b"\x03" + b"\x00\x04\x01" + b"\x06\x02" + struct.pack("<q", 3) + b"\xff\x01x\x00"
BLOCK = struct.pack("<H", len(BODY)) + BODY
DOC = {
    "site": "site-a",
    "counter": 7,
    "msg_id": "ab",
    "base_version": 2,
    "n_samples": 64,
    "privacy": {"mode": "off", "steps": 3, "x": None},
    "created_at": 1.0e9,
    "format": 1,
}


def test_a_hand_built_block_decodes_and_the_encoder_writes_the_same_bytes() -> None:
    doc, used = binhead.unpack(memoryview(BLOCK + b"FLT1..."), "site-a")
    assert doc == DOC and used == len(BLOCK)
    assert binhead.pack(UpdateHeader.from_dict(DOC).to_dict()) == BLOCK


def test_int8_and_every_value_kind() -> None:
    privacy = {"epsilon": 0.25, "accountant": "rdp", "note": "free", "delta": None, "unit_group": -2}
    head = UpdateHeader("site-a", 2**64 - 1, "m", 2**32 - 1, 0, privacy, 5.5, encoding="int8")
    block = binhead.pack(head.to_dict())
    assert block is not None and block[2 + 24] == 1  # the encoding byte: int8
    back, _ = binhead.unpack(memoryview(block), "site-a")
    assert UpdateHeader.from_dict(back) == head
    assert back["privacy"] == privacy and type(back["privacy"]["unit_group"]) is int


@pytest.mark.parametrize(
    "privacy",
    [{"flag": True}, {"big": 2**63}, {"s": "x" * 256}, {"k" * 256: 1}, {f"k{i}": 1 for i in range(65)}],
    ids=["bool", "int>64bit", "long-string", "long-key", "65-fields"],
)
def test_what_the_format_cannot_hold_goes_as_json(privacy: dict) -> None:
    head = UpdateHeader("site-a", 1, "m", 0, 1, privacy, 1.0)
    assert binhead.pack(head.to_dict()) is None
    plain = envelope.encode_update(head, {"w": np.zeros(2, np.float32)}, binary=True)
    assert plain[:4] == b"FLU\x01"  # the JSON header, which every aggregator reads


def _refused(block: bytes) -> str:
    with pytest.raises(WireError) as e:
        binhead.unpack(memoryview(block), "site-a")
    assert e.value.reason == "schema"
    return e.value.detail


def _framed(body: bytes) -> bytes:
    return struct.pack("<H", len(body)) + body


def test_every_malformed_block_is_refused_by_name() -> None:
    assert "truncated in its length" in _refused(b"\x05")
    assert "length 200 does not fit" in _refused(struct.pack("<H", 200) + BODY)
    assert "truncated in its fixed fields" in _refused(_framed(FIXED[:10]))
    assert "encoding 2" in _refused(_framed(FIXED[:-1] + b"\x02" + b"\x00\x00"))
    nan = struct.pack("<QIIdB", 7, 2, 64, float("nan"), 0)
    assert "created_at nan" in _refused(_framed(nan + b"\x00\x00"))
    assert "truncated in msg_id" in _refused(_framed(FIXED + b"\x09ab"))
    assert "msg_id is not UTF-8" in _refused(_framed(FIXED + b"\x01\xff\x00"))
    assert "65 privacy fields" in _refused(_framed(FIXED + b"\x00" + bytes([65])))
    assert "privacy key 10 is not one of 10" in _refused(_framed(FIXED + b"\x00\x01\x0a\x00"))
    assert "unknown tag 9" in _refused(_framed(FIXED + b"\x00\x01\x00\x09"))
    assert "names string 5 of none" in _refused(_framed(FIXED + b"\x00\x01\x00\x04\x05"))
    inf = struct.pack("<d", float("inf"))
    assert "'epsilon' is not finite" in _refused(_framed(FIXED + b"\x00\x01\x07\x01" + inf))
    assert "'mode' twice" in _refused(_framed(FIXED + b"\x00\x02\x00\x00\xff\x04mode\x00"))
    assert "truncated in privacy field 'steps'" in _refused(_framed(FIXED + b"\x00\x01\x06\x02\x01"))
    assert "2 bytes after its last field" in _refused(_framed(BODY + b"\x00\x00"))


def test_a_compact_update_opens_like_the_json_one_and_the_site_comes_from_the_signer() -> None:
    fed = h.make_federation()
    shapes = {"bh.w": (3, 2), "bh.b": (2,)}
    layouts.register_model(shapes)
    privacy = {"mode": "dp-sgd", "accountant": "rdp", "clip_norm": 3.0, "steps": 66, "epsilon": 1.5, "delta": 1e-5}
    head = UpdateHeader("site-a", 4, "0123456789abcdef", 1, 100, privacy, 1.7e9)
    delta = {n: np.full(s, 0.5, np.float32) for n, s in shapes.items()}
    keys = fed.sites["site-a"]
    old = envelope.seal_update(head, delta, keys, fed.agg_box_pub)
    new = envelope.seal_update(head, delta, keys, fed.agg_box_pub, by_reference=True, binary=True)
    json_head = len(envelope.canonical_json(head.to_dict()))
    assert len(old) - len(new) > json_head - 100  # the header alone: ~230 bytes of JSON to ~90 of binary
    for blob in (old, new):
        got, tensors = envelope.open_update(blob, fed.aggregator, fed.enrollment)
        assert got == head and all(tensors[n].tobytes() == delta[n].tobytes() for n in delta)
    # a site signs its own id into the digest: the binary header cannot be re-attributed to another site
    plain = envelope.encode_update(head, delta, binary=True)
    assert plain[:4] == b"FLU\x02" and b"site-a" not in plain


def test_an_older_build_would_refuse_flu2_by_version_and_this_one_refuses_flu3() -> None:
    fed = h.make_federation()
    plain = envelope.encode_update(h.header("site-a", 1), {"w": np.zeros(2, np.float32)}, binary=True)
    with pytest.raises(WireError) as e:
        envelope.open_update(
            h.seal_inner(fed, h.signed_inner(fed.sites["site-a"], "site-a", plain[:3] + b"\x03" + plain[4:])),
            fed.aggregator,
            fed.enrollment,
        )
    assert e.value.reason == "version" and "reads 1 and 2" in e.value.detail
