"""Two ways an update got 85 bytes smaller (issue 19): the signature block without the verify key (FLS2: the
aggregator checks the signature with the site's enrolled key) and an update in one message without the chunk
header (FLC0: a sealed update is recognised by its own magic, its id is the topic's). Each refusal by name,
the old forms still read."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.config import AggregatorSection
from aggregator.metrics import Metrics
from aggregator.reassembly import SenderChunks
from broker_bridge import envelope
from broker_bridge.chunking import split
from broker_bridge.errors import WireError
from broker_bridge.sealopen import ALIGN, seal_open
from tests.bridge import helpers as h


def _keyless(fed: h.Federation, site: str, counter: int, signer: str | None = None) -> bytes:
    """What seal_update(keyless=True) builds, signed by ``signer``'s key (default: the site's own)."""
    plain = envelope.encode_update(h.header(site, counter), h.tensors_of(100))
    keys = fed.sites[signer or site]
    sig = keys.signing_key.sign(envelope.digest(site.encode(), envelope._UPDATE_DOMAIN, b"\x00", plain)).signature
    return h.seal_inner(fed, b"FLS2" + bytes([len(site)]) + site.encode() + sig + plain)


def _reason(fed: h.Federation, blob: bytes) -> str:
    with pytest.raises(WireError) as e:
        envelope.open_update(blob, fed.aggregator, fed.enrollment)
    return f"{e.value.reason}: {e.value.detail}"


def test_a_keyless_update_is_32_bytes_smaller_and_opens_with_the_enrolled_key() -> None:
    fed = h.make_federation()
    head, t = h.header("site-a", 3), h.tensors_of(100)
    keyed = envelope.seal_update(head, t, fed.sites["site-a"], fed.agg_box_pub)
    keyless = envelope.seal_update(head, t, fed.sites["site-a"], fed.agg_box_pub, keyless=True)
    assert len(keyed) - len(keyless) == 32
    got, tensors = envelope.open_update(keyless, fed.aggregator, fed.enrollment)
    assert got == head and all(np.array_equal(tensors[k], t[k]) for k in t)
    assert envelope.open_update(_keyless(fed, "site-a", 4), fed.aggregator, fed.enrollment)[0].counter == 4
    assert envelope.open_update(keyed, fed.aggregator, fed.enrollment)[0] == head  # FLS1 still reads


def test_every_keyless_forgery_is_refused_by_name() -> None:
    fed = h.make_federation()
    # another enrolled site's key (an impostor, or a key rotated out), claiming site-a: as FLS1's "signed by
    # another key"
    assert _reason(fed, _keyless(fed, "site-a", 1, signer="site-b")) == (
        "unenrolled: update claims site 'site-a' but is not signed by its enrolled key"
    )
    # a site not enrolled (site-c has keys, no enrollment): refused before any signature is checked
    assert _reason(fed, _keyless(fed, "site-c", 1)) == "unenrolled: site 'site-c' is not enrolled in federation 'test'"
    good = _keyless(fed, "site-a", 1)
    inner = seal_open(memoryview(good)[4:], fed.aggregator.box_key)
    assert _reason(fed, h.seal_inner(fed, bytes(inner[:20]))) == "signature: signature block is truncated"
    flipped = bytes(inner[:-1]) + bytes([inner[-1] ^ 1])  # sealed again after the change: not signed by site-a
    assert _reason(fed, h.seal_inner(fed, flipped)).startswith("unenrolled: update claims site 'site-a' but is not")
    assert _reason(fed, h.seal_inner(fed, b"FLS3" + bytes(inner[4:]))) == (
        "signature: no signature block inside the sealed update"
    )


def test_the_placement_hint_finds_the_tensors_behind_a_keyless_block() -> None:
    from broker_bridge import layouts

    fed = h.make_federation()
    shapes = {"hint2.w": (8, 4)}
    layouts.register_model(shapes)
    w = np.arange(32, dtype=np.float32).reshape(8, 4)
    head = envelope.UpdateHeader("site-a", 1, "abc", 0, 1, {"mode": "off"}, 1.0)
    sealed = envelope.seal_update(head, {"hint2.w": w}, fed.sites["site-a"], fed.agg_box_pub, True, True, True)
    inner = seal_open(memoryview(sealed)[4:], fed.aggregator.box_key)
    at = envelope._tensor_data_at(inner)
    assert at is not None and bytes(inner[:4]) == b"FLS2" and bytes(inner[at:]) == w.tobytes()
    _, got = envelope.open_update(sealed, fed.aggregator, fed.enrollment)
    assert got["hint2.w"].ctypes.data % ALIGN == 0 and np.array_equal(got["hint2.w"], w)


def _chunks() -> SenderChunks:
    section = AggregatorSection("test", "k", "e", "s", reassembly_max_bytes=4096)
    return SenderChunks(section, Metrics())


def test_a_whole_update_is_the_message_under_the_topics_id_and_chunks_still_reassemble() -> None:
    fed = h.make_federation()
    _, _, sealed = h.seal(fed, "site-a", 1, n_params=100)
    assert envelope.is_sealed_update(sealed) and not envelope.is_sealed_update(split(sealed, "m1")[0])
    c = _chunks()
    assert c.add("site-a", "t/update/m1/0", sealed, "m1") == ("m1", sealed)
    pieces = split(sealed, "m2", 300)
    assert len(pieces) > 1 and [c.add("site-a", "t", p, "m2") for p in pieces][-1] == ("m2", sealed)
    # an aggregator without the topic's id (or an older one) takes the whole update for a bad chunk: counted
    assert c.add("site-a", "t", sealed) is None and c.metrics.chunk_errors._value.get() == 1
    big = b"FLE\x01" + b"\x00" * 5000  # over the reassembly cap: refused and counted, not opened
    assert c.add("site-a", "t", big, "m3") is None and c.metrics.chunk_errors._value.get() == 2
