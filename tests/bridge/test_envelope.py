"""Sealed updates, signed manifests and receipts, in process: every check refuses with its own reason."""

from __future__ import annotations

import numpy as np
import pytest

from broker_bridge import envelope
from broker_bridge.errors import WireError
from broker_bridge.keys import KeyPair
from tests.bridge import helpers as h


@pytest.fixture(scope="module")
def fed() -> h.Federation:
    return h.make_federation()


def _reason(fed: h.Federation, blob: bytes, seen: dict[str, int] | None = None) -> str:
    seen = seen or {}
    with pytest.raises(WireError) as info:
        envelope.open_update(blob, fed.aggregator, fed.enrollment, lambda site, c: c > seen.get(site, -1))
    return info.value.reason


def test_update_opens_bit_exact_with_every_wire_dtype(fed: h.Federation) -> None:
    rng = np.random.default_rng(1)
    tensors = {dt: (rng.standard_normal((3, 5)) * 50).astype(dt) for dt in envelope.DTYPES}
    tensors["big-endian"] = np.arange(6, dtype=">f4").reshape(2, 3)
    tensors["scalar"] = np.array(2.5, dtype=np.float32)
    tensors["empty"] = np.zeros((0, 4), dtype=np.float32)
    head = h.header("site-a", 1)
    blob = envelope.seal_update(head, tensors, fed.sites["site-a"], fed.agg_box_pub)
    got_head, got = envelope.open_update(blob, fed.aggregator, fed.enrollment)
    assert got_head == head
    assert list(got) == list(tensors)
    for name, arr in tensors.items():
        assert got[name].shape == arr.shape
        assert got[name].dtype.str in envelope.DTYPES
        assert got[name].tobytes() == arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        np.testing.assert_array_equal(got[name], arr)


def test_update_is_ciphertext_to_everyone_but_the_aggregator(fed: h.Federation) -> None:
    _, t, blob = h.seal(fed, "site-a", 1)
    assert t["layer.weight"].tobytes()[:64] not in blob
    assert b"site-a" not in blob and b"n_samples" not in blob
    other = KeyPair.generate("aggregator", "aggregator")
    with pytest.raises(WireError) as info:
        envelope.open_update(blob, other, fed.enrollment)
    assert info.value.reason == "decrypt"


def test_each_failure_is_refused_with_its_own_reason(fed: h.Federation) -> None:
    _, _, good = h.seal(fed, "site-a", 5)
    assert _reason(fed, b"") == "framing"
    assert _reason(fed, b"\x00" * 100) == "framing"
    assert _reason(fed, good[:40]) == "framing"
    assert _reason(fed, h.wrong_version(good)) == "version"
    assert _reason(fed, h.tampered(good)) == "decrypt"
    assert _reason(fed, good[:-1]) == "decrypt"  # truncated ciphertext
    assert _reason(fed, h.forged_signature(fed, "site-a", 6)) == "signature"
    assert _reason(fed, h.missing_signature(fed, "site-a", 6)) == "signature"
    assert _reason(fed, h.seal(fed, "site-c", 1)[2]) == "unenrolled"
    assert _reason(fed, h.impostor(fed, signer="site-b", claimed="site-a", counter=6)) == "unenrolled"
    assert _reason(fed, good, seen={"site-a": 5}) == "replay"
    assert _reason(fed, good, seen={"site-a": 9}) == "replay"
    assert _reason(fed, h.bad_schema(fed, "site-a", 6)) == "schema"
    # and the good one still opens
    assert envelope.open_update(good, fed.aggregator, fed.enrollment)[0].counter == 5


def test_checks_run_in_the_documented_order(fed: h.Federation) -> None:
    """A message wrong in several ways is reported by its first failing check."""
    forged_from_outsider = h.seal_inner(fed, h.signed_inner(fed.sites["site-c"], "site-c", b"x" * 50, forge=True))
    assert _reason(fed, forged_from_outsider) == "signature"  # signature before enrollment
    replayed_bad_schema = h.bad_schema(fed, "site-a", 2)
    assert _reason(fed, replayed_bad_schema, seen={"site-a": 2}) == "replay"  # replay before schema
    assert _reason(fed, h.wrong_version(h.tampered(h.seal(fed, "site-a", 1)[2]))) == "version"


def test_header_must_name_the_signer(fed: h.Federation) -> None:
    """site-a cannot sign an update whose header says it comes from site-b."""
    plain = envelope.encode_update(h.header("site-b", 3), h.tensors_of(10))
    blob = h.seal_inner(fed, h.signed_inner(fed.sites["site-a"], "site-a", plain))
    assert _reason(fed, blob) == "schema"
    with pytest.raises(ValueError):
        envelope.seal_update(h.header("site-b", 3), h.tensors_of(10), fed.sites["site-a"], fed.agg_box_pub)


def test_tensor_codec_refuses_what_cannot_go_on_the_wire() -> None:
    with pytest.raises(ValueError, match="dtype"):
        envelope.encode_tensors({"o": np.array(["a"], dtype=object)})
    with pytest.raises(ValueError, match="dtype"):
        envelope.encode_tensors({"c": np.zeros(2, dtype=np.complex64)})
    good = envelope.encode_tensors({"w": np.ones(4, dtype=np.float32)})
    for bad in (good[:-1], good + b"\x00", b"FLT1" + b"\xff\xff\xff\xff", good.replace(b"<f4", b"|O8")):
        with pytest.raises(WireError) as info:
            envelope.decode_tensors(bad)
        assert info.value.reason == "schema"


MANIFEST = {
    "federation": "test",
    "version": 4,
    "created_at": 1.5,
    "spec": {"kind": "mlp"},
    "weights": {"hash": "ab", "size": 10, "chunks": 1},
    "onnx": {"hash": "cd", "size": 20, "chunks": 1},
}
RECEIPT = {"site": "site-a", "counter": 3, "msg_id": "site-a-u3", "verdict": "applied", "reason": None, "version": 5}


@pytest.mark.parametrize(
    "sign, verify, doc",
    [
        (envelope.sign_manifest, envelope.verify_manifest, MANIFEST),
        (envelope.sign_receipt, envelope.verify_receipt, RECEIPT),
    ],
)
def test_signed_documents_verify_and_refuse_tampering(fed: h.Federation, sign, verify, doc) -> None:
    blob = sign(doc, fed.aggregator)
    assert verify(blob, fed.agg_sign_pub) == doc
    impostor = KeyPair.generate("aggregator", "aggregator")

    def reason(b: bytes, pub: bytes = fed.agg_sign_pub) -> str:
        with pytest.raises(WireError) as info:
            verify(b, pub)
        return info.value.reason

    assert reason(sign(doc, impostor)) == "signature"  # forged by another key
    assert reason(blob.replace(b'"test"', b'"tesT"').replace(b'"site-a"', b'"site-b"')) == "signature"
    assert reason(blob[:4] + bytes(64) + blob[68:]) == "signature"  # zeroed signature
    assert reason(blob, bytes(impostor.signing_key.verify_key)) == "signature"
    assert reason(b"garbage" * 20) == "framing"
    assert reason(blob[:10]) == "framing"
    assert reason(blob[:3] + b"\x07" + blob[4:]) == "version"
    incomplete = dict(doc)
    incomplete.pop(next(iter(doc)))
    assert reason(sign(incomplete, fed.aggregator)) == "schema"


def test_manifest_and_receipt_are_not_interchangeable(fed: h.Federation) -> None:
    receipt = envelope.sign_receipt(RECEIPT, fed.aggregator)
    with pytest.raises(WireError) as info:
        envelope.verify_manifest(receipt, fed.agg_sign_pub)
    assert info.value.reason == "framing"
    bad_verdict = envelope.sign_receipt({**RECEIPT, "verdict": "maybe"}, fed.aggregator)
    with pytest.raises(WireError, match="verdict"):
        envelope.verify_receipt(bad_verdict, fed.agg_sign_pub)


def test_federation_secret_box(fed: h.Federation) -> None:
    key = bytes(range(32))
    sealed = envelope.seal_for_federation(b"model bytes", key)
    assert envelope.open_for_federation(sealed, key) == b"model bytes"
    with pytest.raises(WireError) as info:
        envelope.open_for_federation(sealed, bytes(32))
    assert info.value.reason == "decrypt"


def test_from_dict_names_the_first_wrong_field_in_field_order():
    """JSON's exact types pass ``from_dict``'s type check by a set test; any other value gets the full check in the
    fields' order, so the error names the same field as before, and an int subclass (not a bool) still passes."""
    import enum

    good = envelope.UpdateHeader("site-a", 7, "m-7", 2, 40, {"epsilon": 1.5}, 12.5).to_dict()
    # wrong in a later field first in the dict's order, and in "counter": "counter" comes first among the fields
    bad = {"n_samples": "40", **{k: v for k, v in good.items() if k != "n_samples"}, "counter": True}
    with pytest.raises(WireError, match=r"field 'counter' has the wrong type \(True\)"):
        envelope.UpdateHeader.from_dict(bad)
    with pytest.raises(WireError, match=r"field 'created_at' has the wrong type \(False\)"):
        envelope.UpdateHeader.from_dict(dict(good, created_at=False))
    with pytest.raises(WireError, match=r"field 'privacy' has the wrong type"):
        envelope.UpdateHeader.from_dict(dict(good, privacy=[1]))

    class Seven(enum.IntEnum):
        N = 7

    read = envelope.UpdateHeader.from_dict(dict(good, counter=Seven.N))
    assert read.counter == 7 and type(read.counter) is Seven


def test_from_dict_builds_the_header_the_constructor_builds():
    """``UpdateHeader.from_dict`` sets the checked fields without the dataclass's ``__init__``: it must know every
    field (one added to the class but not to the checks would be missing here) and fill ``encoding``'s default."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(envelope.UpdateHeader)}
    assert fields == set(envelope._HEADER_FIELDS)
    for encoding in ("float32", "int8"):
        made = envelope.UpdateHeader("site-a", 7, "m-7", 2, 40, {"epsilon": 1.5, "delta": None}, 12.5, 1, encoding)
        doc = made.to_dict()
        assert ("encoding" in doc) == (encoding == "int8")
        read = envelope.UpdateHeader.from_dict(doc)
        assert read == made and vars(read) == vars(made)
        with pytest.raises(dataclasses.FrozenInstanceError):
            read.counter = 8  # type: ignore[misc]


def test_decoded_tensors_are_the_same_views_over_any_owner():
    """``decode_tensors`` makes its arrays in one call over memory that cannot move (bytes, a NumPy array) and by
    ``np.frombuffer`` over any other owner: the same values, shapes, addresses and flags either way, and a
    ``bytearray`` still cannot be resized under its arrays (the buffer export ``np.frombuffer`` holds)."""
    tensors = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.arange(3, dtype=np.float16),
        "s": np.array(7.5, dtype=np.float32),
        "e": np.zeros((0, 5), dtype=np.float32),
        "q": np.arange(-5, 5, dtype=np.int8),
    }
    blob = envelope.encode_tensors(tensors)
    for pad in (0, 1, 3, 8):  # the block at several offsets inside its owner: aligned and not
        raw = np.zeros(pad + len(blob), np.uint8)
        raw[pad:] = np.frombuffer(blob, np.uint8)
        owners = {"bytes": bytes(pad) + blob, "ndarray": raw, "bytearray": bytearray(bytes(pad) + blob)}
        for kind, owner in owners.items():
            got = envelope.decode_tensors(memoryview(owner)[pad:])
            view = memoryview(owner)[pad:]
            assert list(got) == list(tensors)
            for name, a in got.items():
                assert a.dtype == tensors[name].dtype and a.shape == tensors[name].shape, (kind, name)
                np.testing.assert_array_equal(a, tensors[name])
                assert a.flags.c_contiguous and a.flags.writeable == (kind != "bytes"), (kind, name)
                at = a.__array_interface__["data"][0]
                slow = np.frombuffer(view, a.dtype, a.size, at - np.frombuffer(view, np.uint8).ctypes.data)
                assert a.flags.aligned == slow.flags.aligned, (kind, name, pad)
                assert at == slow.__array_interface__["data"][0]
            if kind == "bytearray":
                del view, slow, a
                with pytest.raises(BufferError):
                    owner.extend(b"x" * 4096)  # got's arrays still hold the export
                del got
                owner.extend(b"x")  # and nothing else did
