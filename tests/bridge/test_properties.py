"""Property tests: decoders fed random input raise only the library's own errors, never
crash or hang; encoders and decoders round-trip whatever they are given."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from broker_bridge import envelope
from broker_bridge.chunking import Reassembler, parse_chunk, split
from broker_bridge.errors import FedlineError, WireError
from broker_bridge.topics import Topics
from tests.bridge import helpers as h

pytestmark = pytest.mark.timeout(120)  # a hang fails here, not at the suite's 300 s

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FED = h.make_federation()
T = Topics("test")
_, _, GOOD_UPDATE = h.seal(FED, "site-a", 1, n_params=64)
GOOD_TENSORS = envelope.encode_tensors(h.tensors_of(64))
GOOD_MANIFEST = envelope.sign_manifest(
    {
        "federation": "test",
        "version": 1,
        "created_at": 0,
        "spec": {},
        "weights": {"hash": "", "size": 0, "chunks": 0},
        "onnx": {"hash": "", "size": 0, "chunks": 0},
    },
    FED.aggregator,
)
GOOD_RECEIPT = envelope.sign_receipt(
    {"site": "site-a", "counter": 1, "msg_id": "u1", "verdict": "applied", "reason": None, "version": 2}, FED.aggregator
)
GOOD_CHUNKS = split(GOOD_UPDATE, "u1", 200)


def mutations(good: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, the right magic followed by random bytes, and a valid message
    with bytes flipped, cut or appended: the inputs most likely to get past the first check."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        b = bytearray(good)
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["flip", "cut", "append", "overwrite"]))
            if op == "flip" and b:
                i = draw(st.integers(0, len(b) - 1))
                b[i] ^= draw(st.integers(1, 255))
            elif op == "cut":
                del b[draw(st.integers(0, len(b))) :]
            elif op == "append":
                b += draw(st.binary(max_size=64))
            elif b:
                i = draw(st.integers(0, len(b) - 1))
                chunk = draw(st.binary(min_size=1, max_size=16))
                b[i : i + len(chunk)] = chunk
        return bytes(b)

    return st.one_of(
        st.binary(max_size=512),
        st.binary(max_size=256).map(lambda tail: good[:4] + tail),
        mutate(),
    )


def only_wire_errors(fn, blob: bytes) -> None:
    try:
        fn(blob)
    except WireError as exc:
        assert exc.reason in WireError.REASONS
    # any other exception propagates and fails the property


@FUZZ
@given(mutations(GOOD_TENSORS))
def test_decode_tensors_never_crashes(blob: bytes) -> None:
    only_wire_errors(envelope.decode_tensors, blob)


@FUZZ
@given(mutations(GOOD_UPDATE))
def test_open_update_never_crashes(blob: bytes) -> None:
    only_wire_errors(lambda b: envelope.open_update(b, FED.aggregator, FED.enrollment), blob)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
header_fields = st.sampled_from(
    ["site", "counter", "msg_id", "base_version", "n_samples", "privacy", "created_at", "format", "extra"]
)


@FUZZ
@given(st.dictionaries(header_fields, json_values), st.one_of(st.binary(max_size=200), st.just(GOOD_TENSORS)))
def test_signed_and_sealed_garbage_plaintext_never_crashes(doc: dict, tail: bytes) -> None:
    """An enrolled site's key signing nonsense gets past decrypt and signature:
    the header and tensor parsers must still refuse it cleanly."""
    head = envelope.canonical_json(doc)
    plain = b"FLU\x01" + len(head).to_bytes(4, "little") + head + tail
    blob = h.seal_inner(FED, h.signed_inner(FED.sites["site-a"], "site-a", plain))
    try:
        got, _ = envelope.open_update(blob, FED.aggregator, FED.enrollment)
    except WireError as exc:
        assert exc.reason in ("schema", "version", "replay")
    else:
        assert got.site == "site-a"


@FUZZ
@given(mutations(GOOD_MANIFEST))
def test_verify_manifest_never_crashes(blob: bytes) -> None:
    only_wire_errors(lambda b: envelope.verify_manifest(b, FED.agg_sign_pub), blob)


@FUZZ
@given(mutations(GOOD_RECEIPT))
def test_verify_receipt_never_crashes(blob: bytes) -> None:
    only_wire_errors(lambda b: envelope.verify_receipt(b, FED.agg_sign_pub), blob)


@FUZZ
@given(st.dictionaries(st.sampled_from(list(envelope.MANIFEST_FIELDS) + list(envelope.RECEIPT_FIELDS)), json_values))
def test_correctly_signed_odd_documents_never_crash(doc: dict) -> None:
    """Even the aggregator's own key over a malformed document gives only schema errors."""
    for sign, verify in (
        (envelope.sign_manifest, envelope.verify_manifest),
        (envelope.sign_receipt, envelope.verify_receipt),
    ):
        try:
            assert verify(sign(doc, FED.aggregator), FED.agg_sign_pub) == doc
        except WireError as exc:
            assert exc.reason == "schema"


@FUZZ
@given(st.lists(mutations(GOOD_CHUNKS[1]), min_size=1, max_size=8))
def test_parse_chunk_and_reassembler_never_crash(raws: list[bytes]) -> None:
    r = Reassembler(max_bytes=1 << 20)
    for raw in raws:
        for fn in (parse_chunk, r.add):
            try:
                fn(raw)
            except WireError as exc:
                assert exc.reason == "framing"
    assert r.held_bytes <= 1 << 20


def _chunk_bytes(mid: str, i: int, n: int, total: int, dig: bytes, payload: bytes) -> bytes:
    return (
        b"FLC1"
        + bytes([len(mid)])
        + mid.encode()
        + i.to_bytes(4, "little")
        + n.to_bytes(4, "little")
        + total.to_bytes(8, "little")
        + dig
        + payload
    )


@st.composite
def forged_chunk_streams(draw: st.DrawFn) -> list[bytes]:
    """A few message headers first, then chunks that mostly agree with one of them,
    so the stream reaches the checks behind the header parser (consistency, size, digest)."""
    specs = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["a", "b", "c"]),
                st.integers(0, 9),
                st.integers(0, 7999),
                st.sampled_from([bytes(16), b"\x01" * 16]),
            ),
            min_size=1,
            max_size=3,
        )
    )
    out = []
    for _ in range(draw(st.integers(1, 30))):
        mid, n, total, dig = draw(st.sampled_from(specs))
        if draw(st.integers(0, 9)) == 0:  # sometimes a chunk that contradicts its message
            n, total = draw(st.integers(0, 9)), draw(st.integers(0, 7999))
        size = draw(st.integers(0, 3000) | st.just(total))
        out.append(_chunk_bytes(mid, draw(st.integers(0, 9)), n, total, dig, b"\x00" * size))
    return out


@FUZZ
@given(forged_chunk_streams())
def test_reassembler_under_hostile_well_formed_headers(raws: list[bytes]) -> None:
    """Headers that parse but lie (counts, totals, digests that disagree): only
    ChunkErrors, and the memory held never exceeds the cap."""
    cap = 8000
    r = Reassembler(max_bytes=cap)
    for raw in raws:
        try:
            r.add(raw)
        except WireError as exc:
            assert exc.reason == "framing"
        assert 0 <= r.held_bytes <= cap
    assert r.stats.completed + r.stats.corrupt <= len(raws)


@FUZZ
@given(
    st.one_of(
        st.text(max_size=80),
        st.text(max_size=60).map(lambda s: "fedline/test/" + s),
        st.lists(
            st.sampled_from(
                [
                    "sites",
                    "site-a",
                    "update",
                    "model",
                    "manifest",
                    "weights",
                    "onnx",
                    "receipts",
                    "status",
                    "0",
                    "12",
                    "+",
                    "#",
                    "",
                    "²",
                    "x\n",
                ]
            ),
            max_size=6,
        ).map(lambda parts: "fedline/test/" + "/".join(parts)),
    )
)
def test_topics_parse_never_crashes(topic: str) -> None:
    try:
        info = T.parse(topic)
    except FedlineError:
        return
    rebuilt = {
        "update": lambda: T.update_chunk(info.site, info.msg_id, info.index),
        "receipts": lambda: T.receipts(info.site),
        "status": lambda: T.status(info.site),
        "manifest": T.manifest,
        "weights": lambda: T.weights_chunk(info.version, info.index),
        "onnx": lambda: T.onnx_chunk(info.version, info.index),
    }[info.kind]()
    assert T.parse(rebuilt) == info


# --------------------------------------------------------------------------- round trips
wire_dtypes = st.sampled_from([np.dtype(d) for d in envelope.DTYPES] + [np.dtype(">f4"), np.dtype(">i8")])
arrays = wire_dtypes.flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
)


@ROUND
@given(st.dictionaries(st.text(min_size=1, max_size=12), arrays, max_size=5))
def test_tensors_round_trip_bit_exact(tensors: dict[str, np.ndarray]) -> None:
    got = envelope.decode_tensors(envelope.encode_tensors(tensors))
    assert list(got) == list(tensors)
    for name, arr in tensors.items():
        assert got[name].shape == arr.shape
        assert got[name].dtype == arr.dtype.newbyteorder("<") or got[name].dtype == arr.dtype
        assert got[name].tobytes() == arr.astype(got[name].dtype).tobytes()  # bit-exact, NaNs included


@ROUND
@given(
    st.lists(st.tuples(st.integers(0, 40_000), st.integers(64, 9000)), min_size=1, max_size=5),
    st.randoms(use_true_random=False),
    st.floats(0, 1),
)
def test_split_and_reassemble_any_order_with_duplicates(
    specs: list[tuple[int, int]], rnd: random.Random, dup_rate: float
) -> None:
    blobs, chunks = {}, []
    for i, (size, limit) in enumerate(specs):
        msg_id = f"m{i}"
        blobs[msg_id] = rnd.randbytes(size)
        parts = split(blobs[msg_id], msg_id, limit)
        assert all(len(p) <= limit for p in parts)
        chunks += parts
    chunks += [c for c in chunks if rnd.random() < dup_rate]
    rnd.shuffle(chunks)
    r = Reassembler()
    done = {}
    for c in chunks:
        got = r.add(c)
        if got is not None:
            assert got[0] not in done
            done[got[0]] = got[1]
    assert done == blobs
    assert r.held_bytes == 0


@ROUND
@given(
    st.integers(0, 2**40),
    st.integers(0, 2**31),
    st.integers(0, 10**6),
    st.dictionaries(
        st.sampled_from(["clip_norm", "noise_multiplier", "epsilon", "steps", "accountant"]),
        st.one_of(
            st.none(), st.floats(allow_nan=False, allow_infinity=False), st.integers(0, 10**9), st.text(max_size=8)
        ),
    ),
    arrays,
)
def test_sealed_updates_round_trip(counter: int, base: int, n: int, privacy: dict, arr: np.ndarray) -> None:
    head = envelope.UpdateHeader("site-b", counter, f"u{counter}", base, n, privacy, created_at=1.0)
    blob = envelope.seal_update(head, {"delta": arr}, FED.sites["site-b"], FED.agg_box_pub)
    got, tensors = envelope.open_update(blob, FED.aggregator, FED.enrollment)
    assert got == head
    assert tensors["delta"].shape == arr.shape
    assert tensors["delta"].tobytes() == arr.astype(tensors["delta"].dtype).tobytes()


def test_fuzz_inputs_reach_past_the_first_check() -> None:
    """The mutation strategy is only useful if it gets beyond the magic check sometimes."""
    reasons = set()
    rng = random.Random(0)
    for _ in range(300):
        b = bytearray(GOOD_UPDATE)
        b[rng.randrange(4, len(b))] ^= 1
        try:
            envelope.open_update(bytes(b), FED.aggregator, FED.enrollment)
        except WireError as exc:
            reasons.add(exc.reason)
    assert reasons == {"decrypt"}
    with pytest.raises(WireError) as info:
        envelope.open_update(GOOD_UPDATE[:4] + GOOD_UPDATE[5:], FED.aggregator, FED.enrollment)
    assert info.value.reason == "decrypt"
