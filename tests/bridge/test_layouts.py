"""The tensor table by reference (FLT2): hand-built bytes, the layout id's binding, and the refusals."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
from nacl.public import PublicKey, SealedBox

from broker_bridge import envelope, layouts, quantised
from broker_bridge.errors import WireError
from tests.bridge import helpers as h

# a model of its own (no other test registers it): 2x3 weight, 3 biases
SHAPES = {"lin.weight": (2, 3), "lin.bias": (3,)}
TABLE = b'[{"name":"lin.weight","dtype":"<f4","shape":[2,3]},{"name":"lin.bias","dtype":"<f4","shape":[3]}]'


def test_the_float32_table_is_the_flt1_table_and_its_id_the_first_16_bytes_of_its_sha256() -> None:
    assert layouts.float32_table(SHAPES) == TABLE
    ids = layouts.register_model(SHAPES)
    assert ids["float32"] == hashlib.sha256(TABLE).digest()[:16]
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([-1.0, 0.5, 2.0], dtype=np.float32)
    flt1 = envelope.encode_tensors({"lin.weight": w, "lin.bias": b})
    assert flt1 == b"FLT1" + struct.pack("<I", len(TABLE)) + TABLE + w.tobytes() + b.tobytes()
    flt2 = envelope.encode_tensors({"lin.weight": w, "lin.bias": b}, by_reference=True)
    assert flt2 == b"FLT2" + hashlib.sha256(TABLE).digest()[:16] + w.tobytes() + b.tobytes()
    assert len(flt1) - len(flt2) == 4 + len(TABLE) - 16


def test_a_hand_built_flt2_block_decodes_to_its_arrays() -> None:
    layouts.register_model(SHAPES)
    data = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9], dtype="<f4").tobytes()
    got = envelope.decode_tensors(b"FLT2" + hashlib.sha256(TABLE).digest()[:16] + data)
    assert list(got) == ["lin.weight", "lin.bias"]
    assert got["lin.weight"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert got["lin.bias"].tolist() == [7, 8, 9]
    assert got["lin.weight"].dtype == np.dtype("<f4")


def test_the_int8_table_is_what_quantised_encode_writes() -> None:
    shapes = {"k.w": (40, 30), "k.b": (30,)}  # 1,200 values: two blocks of steps
    table = layouts.int8_table(shapes)
    assert table == (
        b'[{"name":"k.w","dtype":"|i1","shape":[40,30]},{"name":"k.w#scale","dtype":"<f4","shape":[2]},'
        b'{"name":"k.b","dtype":"|i1","shape":[30]},{"name":"k.b#scale","dtype":"<f4","shape":[1]}]'
    )
    rng = np.random.default_rng(3)
    delta = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    q = quantised.encode(delta, "int8", rng)
    flt1 = envelope.encode_tensors(q)
    assert flt1[8 : 8 + len(table)] == table
    ids = layouts.register_model(shapes)
    flt2 = envelope.encode_tensors(q, by_reference=True)
    assert flt2[:20] == b"FLT2" + ids["int8"] and flt2[20:] == flt1[8 + len(table) :]
    back = envelope.decode_tensors(flt2)
    assert all(back[n].tobytes() == q[n].tobytes() for n in q)


def test_an_unknown_layout_id_is_refused_never_guessed() -> None:
    # the same data under the id of a table nobody registered: one dimension swapped
    other = b'[{"name":"lin.weight","dtype":"<f4","shape":[3,2]},{"name":"lin.bias","dtype":"<f4","shape":[3]}]'
    layouts.register_model(SHAPES)
    blob = b"FLT2" + hashlib.sha256(other).digest()[:16] + bytes(36)
    with pytest.raises(WireError, match="FLT2 tensor layout .* is not one derived from this party's model spec") as e:
        envelope.decode_tensors(blob)
    assert e.value.reason == "schema"


@pytest.mark.parametrize(
    ("shapes", "why"),
    [
        ({"lin.weight": (3, 2), "lin.bias": (3,)}, "shape"),
        ({"lin.bias": (3,), "lin.weight": (2, 3)}, "order"),
        ({"lin.weight": (2, 3), "lin.b": (3,)}, "name"),
    ],
)
def test_any_difference_of_shape_order_or_name_is_another_id(shapes: dict, why: str) -> None:
    assert layouts.float32_table(shapes) != TABLE
    assert envelope.layout_id(layouts.float32_table(shapes)) != envelope.layout_id(TABLE), why


def test_dtype_is_bound_too() -> None:
    ids = layouts.register_model(SHAPES)
    assert ids["float32"] != ids["int8"]
    # float64 arrays of the registered shapes have another table: they go out as FLT1, never as the float32 id
    blob = envelope.encode_tensors({n: np.zeros(s) for n, s in SHAPES.items()}, by_reference=True)
    assert blob[:4] == b"FLT1"


def test_tensors_of_no_registered_layout_fall_back_to_flt1() -> None:
    blob = envelope.encode_tensors({"unregistered.x": np.zeros(5, np.float32)}, by_reference=True)
    assert blob[:4] == b"FLT1"


@pytest.mark.parametrize(
    ("tail", "match"),
    [
        (bytes(35), "tensor 'lin.bias': 12 bytes declared, 11 left"),
        (bytes(37), "1 trailing bytes after the last tensor"),
        (b"", "tensor 'lin.weight': 24 bytes declared, 0 left"),
    ],
)
def test_flt2_data_must_be_exactly_the_layouts_size(tail: bytes, match: str) -> None:
    layouts.register_model(SHAPES)
    with pytest.raises(WireError, match=match):
        envelope.decode_tensors(b"FLT2" + hashlib.sha256(TABLE).digest()[:16] + tail)


@pytest.mark.parametrize("blob", [b"FLT2", b"FLT2" + bytes(15), b"FLT3" + bytes(40), b""])
def test_truncated_or_unknown_magic_is_refused(blob: bytes) -> None:
    with pytest.raises(WireError, match="does not start with FLT1 or FLT2"):
        envelope.decode_tensors(blob)


def test_registration_validates_and_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(WireError, match="dtype"):
        envelope.register_layout(b'[{"name":"x","dtype":"<c8","shape":[1]}]')
    monkeypatch.setattr(envelope, "_BY_ID", {bytes([i]) * 16: () for i in range(envelope.MAX_LAYOUTS)})
    with pytest.raises(ValueError, match="layouts registered"):
        envelope.register_layout(b'[{"name":"y","dtype":"<f4","shape":[1]}]')
    assert len(envelope._BY_ID) == envelope.MAX_LAYOUTS  # nothing more was added


def test_an_flt2_update_opens_signed_and_sealed_and_a_tampered_id_does_not() -> None:
    fed = h.make_federation()
    layouts.register_model(SHAPES)
    delta = {"lin.weight": np.full((2, 3), 0.25, np.float32), "lin.bias": np.ones(3, np.float32)}
    head = h.header("site-a", 1)
    blob = envelope.seal_update(head, delta, fed.sites["site-a"], fed.agg_box_pub, by_reference=True)
    old = envelope.seal_update(head, delta, fed.sites["site-a"], fed.agg_box_pub)
    assert len(old) - len(blob) == 4 + len(TABLE) - 16  # the table's bytes, less the id's
    got_head, got = envelope.open_update(blob, fed.aggregator, fed.enrollment)
    assert got_head == head and all(got[n].tobytes() == delta[n].tobytes() for n in delta)
    # the id is inside the signed plaintext: the site's signature covers it
    plain = envelope.encode_update(head, delta, by_reference=True)
    assert plain.endswith(
        b"FLT2" + hashlib.sha256(TABLE).digest()[:16] + delta["lin.weight"].tobytes() + b"\0\0\x80?" * 3
    )
    keys = fed.sites["site-a"]
    sig = keys.signing_key.sign(envelope.digest(b"site-a", b"fedline-update-v1\0", b"\0", plain)).signature
    other = envelope.layout_id(layouts.int8_table(SHAPES))  # a registered id, swapped in after signing
    at = plain.index(b"FLT2") + 4
    forged = plain[:at] + other + plain[at + 16 :]
    inner = b"FLS1" + bytes([6]) + b"site-a" + bytes(keys.signing_key.verify_key) + sig + forged
    sealed = b"FLE\x01" + SealedBox(PublicKey(fed.agg_box_pub)).encrypt(inner)
    with pytest.raises(WireError) as e:
        envelope.open_update(sealed, fed.aggregator, fed.enrollment)
    assert e.value.reason == "signature"
