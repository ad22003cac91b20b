"""The binary update header (FLU version 2): hand-built bytes, every refusal, and the whole update through it."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from broker_bridge import binhead, envelope, layouts
from broker_bridge.envelope import UpdateHeader
from broker_bridge.errors import WireError
from tests.bridge import helpers as h

FIXED = struct.pack("<QIIdB", 7, 2, 64, 1.0e9, 0)  # counter, base version, samples, created_at, float32
# msg_id "ab"; three privacy fields: mode = "off" (key 0, interned string 1), steps = 300 (key 6, LEB128: 0xac 0x02),
# "x" = null (a key by name)
BODY = FIXED + b"\x02ab" + b"\x03" + b"\x00\x04\x01" + b"\x06\x05\xac\x02" + b"\xff\x01x\x00"
BLOCK = struct.pack("<H", len(BODY)) + BODY
DOC = {
    "site": "site-a",
    "counter": 7,
    "msg_id": "ab",
    "base_version": 2,
    "n_samples": 64,
    "privacy": {"mode": "off", "steps": 300, "x": None},
    "created_at": 1.0e9,
    "format": 1,
}


def test_a_hand_built_block_decodes_and_the_encoder_writes_the_same_bytes() -> None:
    doc, used = binhead.unpack(memoryview(BLOCK + b"FLT1..."), "site-a")
    assert doc == DOC and used == len(BLOCK)
    assert binhead.pack(UpdateHeader.from_dict(DOC).to_dict()) == BLOCK


def test_int8_and_every_value_kind() -> None:
    privacy = {"epsilon": 0.25, "accountant": "rdp", "note": "free", "delta": None, "unit_group": -2, "n": 2**64 - 1}
    head = UpdateHeader("site-a", 2**64 - 1, "m", 2**32 - 1, 0, privacy, 5.5, encoding="int8")
    block = binhead.pack(head.to_dict())
    assert block is not None and block[2 + 24] == 1  # the encoding byte: int8
    back, _ = binhead.unpack(memoryview(block), "site-a")
    assert UpdateHeader.from_dict(back) == head
    assert back["privacy"] == privacy and type(back["privacy"]["unit_group"]) is int


@pytest.mark.parametrize(
    "privacy",
    [
        {"flag": True},
        {"big": 2**64},
        {"low": -(2**63) - 1},
        {"s": "x" * 256},
        {"k" * 256: 1},
        {f"k{i}": 1 for i in range(65)},
    ],
    ids=["bool", "int>=2^64", "int<-2^63", "long-string", "long-key", "65-fields"],
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
    assert "65 fields, at most 64" in _refused(_framed(FIXED + b"\x00" + bytes([65])))
    assert "key 10 is not one of 10" in _refused(_framed(FIXED + b"\x00\x01\x0a\x00"))
    assert "unknown tag 9" in _refused(_framed(FIXED + b"\x00\x01\x00\x09"))
    assert "names string 5 of 5" in _refused(_framed(FIXED + b"\x00\x01\x00\x04\x05"))
    assert "'steps' is not an integer below 2^64" in _refused(_framed(FIXED + b"\x00\x01\x06\x05" + b"\xff" * 10))
    assert "'steps' is not an integer below 2^64" in _refused(
        _framed(FIXED + b"\x00\x01\x06\x05" + b"\xff" * 9 + b"\x02")
    )
    inf = struct.pack("<d", float("inf"))
    assert "'epsilon' is not finite" in _refused(_framed(FIXED + b"\x00\x01\x07\x01" + inf))
    assert "'mode' twice" in _refused(_framed(FIXED + b"\x00\x02\x00\x00\xff\x04mode\x00"))
    assert "truncated in field 'steps'" in _refused(_framed(FIXED + b"\x00\x01\x06\x02\x01"))
    assert "truncated in field 'steps'" in _refused(_framed(FIXED + b"\x00\x01\x06\x05\x80"))
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


# --------------------------------------------------------------------------- receipts (FLR version 2)
RECEIPT = {
    "site": "site-a",
    "counter": 5,
    "msg_id": "ab",
    "verdict": "buffered",
    "reason": None,
    "version": 3,
    "weight": 0.5,
}
# 7 fields: site (key 0, string "site-a"), counter (key 1, LEB128 5), msg_id (key 2, "ab"), verdict (key 3,
# interned string 1: buffered), reason (key 4, null), version (key 5, LEB128 3), weight (key 8, f64 0.5)
RECEIPT_BODY = (
    b"\x07"
    + b"\x00\x03\x06site-a"
    + b"\x01\x05\x05"
    + b"\x02\x03\x02ab"
    + b"\x03\x04\x01"
    + b"\x04\x00"
    + b"\x05\x05\x03"
    + b"\x08\x01"
    + struct.pack("<d", 0.5)
)


def test_a_hand_built_receipt_body_is_what_the_encoder_writes_and_verifies_signed() -> None:
    fed = h.make_federation()
    assert binhead.pack_receipt(RECEIPT) == RECEIPT_BODY
    assert binhead.unpack_receipt(memoryview(RECEIPT_BODY)) == RECEIPT
    signed = envelope.sign_receipt(RECEIPT, fed.aggregator, binary=True)
    assert signed[:4] == b"FLR\x02" and signed[68:] == RECEIPT_BODY
    sig = fed.aggregator.signing_key.sign(hashlib.sha256(b"fedline-receipt-v2\0" + RECEIPT_BODY).digest())
    assert signed[4:68] == sig.signature
    agg_pub = bytes(fed.aggregator.signing_key.verify_key)
    assert envelope.verify_receipt(signed, agg_pub) == RECEIPT
    json_signed = envelope.sign_receipt(RECEIPT, fed.aggregator)
    assert json_signed[:4] == b"FLR\x01" and len(json_signed) - len(signed) > 60


def test_a_binary_receipt_sealed_to_its_site_opens_only_there_and_every_forgery_fails() -> None:
    fed = h.make_federation()
    agg_pub = bytes(fed.aggregator.signing_key.verify_key)
    site = fed.sites["site-a"]
    sealed = envelope.seal_receipt(RECEIPT, fed.aggregator, site.public().box_pub, binary=True)
    assert envelope.open_receipt(sealed, site, agg_pub) == RECEIPT
    with pytest.raises(WireError) as e:
        envelope.open_receipt(sealed, fed.sites["site-b"], agg_pub)
    assert e.value.reason == "decrypt"
    signed = envelope.sign_receipt(RECEIPT, fed.aggregator, binary=True)
    # a flipped body byte; the v2 signature presented as v1 (other domain); signed by a site, not the aggregator
    flipped = signed[:-1] + bytes([signed[-1] ^ 1])
    as_v1 = signed[:3] + b"\x01" + signed[4:]
    sig = site.signing_key.sign(hashlib.sha256(b"fedline-receipt-v2\0" + RECEIPT_BODY).digest()).signature
    by_site = b"FLR\x02" + sig + RECEIPT_BODY
    for forged, reason in ((flipped, "signature"), (as_v1, "signature"), (by_site, "signature")):
        with pytest.raises(WireError) as e:
            envelope.verify_receipt(forged, agg_pub)
        assert e.value.reason == reason
    # another site's receipt, sealed to this one: refused by name
    other = envelope.seal_receipt({**RECEIPT, "site": "site-b"}, fed.aggregator, site.public().box_pub, binary=True)
    with pytest.raises(WireError, match="receipt for site 'site-b' sealed to 'site-a'"):
        envelope.open_receipt(other, site, agg_pub)


def _signed_body(fed: h.Federation, body: bytes) -> bytes:
    sig = fed.aggregator.signing_key.sign(hashlib.sha256(b"fedline-receipt-v2\0" + body).digest()).signature
    return b"FLR\x02" + sig + body


def test_malformed_binary_receipts_are_refused_by_name_even_when_the_aggregator_signed_them() -> None:
    fed = h.make_federation()
    agg_pub = bytes(fed.aggregator.signing_key.verify_key)

    def refused(body: bytes) -> str:
        with pytest.raises(WireError) as e:
            envelope.verify_receipt(_signed_body(fed, body), agg_pub)
        return f"{e.value.reason}: {e.value.detail}"

    assert refused(RECEIPT_BODY + b"\x00") == "schema: binary receipt: 1 bytes after its last field"
    assert refused(b"\x01\x00\x03\x06site-a") == "schema: receipt lacks counter, msg_id, verdict, reason, version"
    assert refused(RECEIPT_BODY[:-3]).startswith("schema: binary receipt is truncated in field 'weight'")
    assert "verdict 'maybe'" in refused(
        b"\x07" + RECEIPT_BODY[1:31].replace(b"\x03\x04\x01", b"\x03\x03\x05maybe") + RECEIPT_BODY[31:]
    )
    big = _signed_body(fed, b"\x00" * (envelope.MAX_HEADER_BYTES + 1))
    with pytest.raises(WireError, match="not the size of a receipt"):
        envelope.verify_receipt(big, agg_pub)


def test_a_receipt_the_binary_form_cannot_hold_goes_as_json() -> None:
    fed = h.make_federation()
    doc = {**RECEIPT, "detail": "x" * 300}
    assert binhead.pack_receipt(doc) is None
    signed = envelope.sign_receipt(doc, fed.aggregator, binary=True)
    assert signed[:4] == b"FLR\x01"
    assert envelope.verify_receipt(signed, bytes(fed.aggregator.signing_key.verify_key)) == doc


def test_the_aggregators_placement_hint_finds_the_tensors_behind_a_binary_header_and_flt2() -> None:
    """``seal_open`` puts the first tensor byte on an aligned address from the hint: for FLU2 + FLT2 it must
    point at the data right after the layout id, whatever the msg_id's length."""
    from broker_bridge.sealopen import ALIGN, seal_open

    fed = h.make_federation()
    shapes = {"hint.w": (8, 4)}
    layouts.register_model(shapes)
    w = np.arange(32, dtype=np.float32).reshape(8, 4)
    for msg_id in ("a", "ab", "abc", "abcd"):
        head = UpdateHeader("site-a", 1, msg_id, 0, 1, {"mode": "off"}, 1.0)
        sealed = envelope.seal_update(head, {"hint.w": w}, fed.sites["site-a"], fed.agg_box_pub, True, True)
        inner = seal_open(memoryview(sealed)[4:], fed.aggregator.box_key)
        at = envelope._tensor_data_at(inner)
        assert at is not None and bytes(inner[at - 20 : at - 16]) == b"FLT2" and bytes(inner[at:]) == w.tobytes()
        placed = seal_open(memoryview(sealed)[4:], fed.aggregator.box_key, place=envelope._tensor_data_at)
        _, got = envelope.open_update(sealed, fed.aggregator, fed.enrollment)
        assert got["hint.w"].ctypes.data % ALIGN == 0 and np.array_equal(got["hint.w"], w)
        assert bytes(placed) == bytes(inner)


# --------------------------------------------------------------------------- compact receipts (FLR version 3)
FULL = {**RECEIPT, "msg_id": "0123456789abcdef", "detail": None, "staleness": 0}
# 7 fields, the nulls (reason, detail) left out: site, counter, msg_id as its 8 raw bytes (tag 8), verdict,
# version, weight, staleness (key 7, LEB128 0)
COMPACT_BODY = (
    b"\x07"
    + b"\x00\x03\x06site-a"
    + b"\x01\x05\x05"
    + b"\x02\x08\x08"
    + bytes.fromhex("0123456789abcdef")
    + b"\x03\x04\x01"
    + b"\x05\x05\x03"
    + b"\x08\x01"
    + struct.pack("<d", 0.5)
    + b"\x07\x05\x00"
)


def test_a_hand_built_compact_receipt_is_what_the_encoder_writes_and_reads_back_whole() -> None:
    fed = h.make_federation()
    agg_pub = bytes(fed.aggregator.signing_key.verify_key)
    assert binhead.pack_receipt(FULL, compact=True) == COMPACT_BODY
    assert binhead.unpack_receipt(memoryview(COMPACT_BODY), compact=True) == {**FULL, "reason": None}
    signed = envelope.sign_receipt(FULL, fed.aggregator, binary=True, compact=True)
    sig = fed.aggregator.signing_key.sign(hashlib.sha256(b"fedline-receipt-v3\0" + COMPACT_BODY).digest())
    assert signed == b"FLR\x03" + sig.signature + COMPACT_BODY
    assert envelope.verify_receipt(signed, agg_pub) == FULL
    v2 = envelope.sign_receipt(FULL, fed.aggregator, binary=True)
    assert v2[:4] == b"FLR\x02" and len(v2) - len(signed) == 12  # two nulls, half the message id
    site = fed.sites["site-a"]
    sealed = envelope.seal_receipt(FULL, fed.aggregator, site.public().box_pub, binary=True, compact=True)
    assert envelope.open_receipt(sealed, site, agg_pub) == FULL


def test_compact_receipts_refuse_forgeries_and_what_no_receipt_holds() -> None:
    fed = h.make_federation()
    agg_pub = bytes(fed.aggregator.signing_key.verify_key)

    def signed(body: bytes, domain: bytes = b"fedline-receipt-v3\0", version: int = 3) -> bytes:
        sig = fed.aggregator.signing_key.sign(hashlib.sha256(domain + body).digest()).signature
        return b"FLR" + bytes([version]) + sig + body

    def refused(blob: bytes) -> str:
        with pytest.raises(WireError) as e:
            envelope.verify_receipt(blob, agg_pub)
        return f"{e.value.reason}: {e.value.detail}"

    # a v3 body under the v2 domain, or presented as v2: the signature does not verify
    assert refused(signed(COMPACT_BODY, b"fedline-receipt-v2\0")).startswith("signature")
    assert refused(signed(COMPACT_BODY)[:3] + b"\x02" + signed(COMPACT_BODY)[4:]).startswith("signature")
    assert refused(signed(b"\x01\x00\x03\x01a")) == "schema: receipt lacks counter, msg_id, verdict"
    assert refused(signed(b"\x02\x00\x03\x01a\x06\x0a")) == (
        "schema: binary receipt: a map, a list or a boolean is no receipt field"
    )
    assert refused(signed(COMPACT_BODY + b"\x00")) == "schema: binary receipt: 1 bytes after its last field"
    # the version 2 decoder never reads the extended tags
    with pytest.raises(WireError, match="unknown tag 8"):
        binhead.unpack_receipt(memoryview(COMPACT_BODY))
