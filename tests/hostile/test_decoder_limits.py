"""No unbounded memory, and only the library's own errors, on inputs a fuzzer finds slowly.

A coverage-guided fuzzer finds new branches, not large quantities: a chunk
header that *claims* 4 GiB, a message whose chunks add up to more than it
announced, a key file with a 5,000-digit number or 10,000 nested brackets.
These are written out here, each as the attacker would send it, with the
allocation measured by ``tracemalloc``.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from broker_bridge import chunking, envelope, layouts
from broker_bridge.errors import ChunkError, KeyFileError, WireError
from broker_bridge.keys import Enrollment, KeyPair, PublicKeys
from fedline.config import ConfigError

MiB = 1 << 20


def raw_chunk(msg_id: str, index: int, count: int, total: int, payload: bytes, digest: bytes = b"\x01" * 16) -> bytes:
    """A chunk with whatever header fields an attacker chooses."""
    return (
        chunking.MAGIC
        + bytes([len(msg_id)])
        + msg_id.encode()
        + struct.pack("<IIQ16s", index, count, total, digest)
        + payload
    )


def peak_allocation(fn) -> int:
    """Bytes allocated at the peak while ``fn`` runs (its result is discarded)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        try:
            fn()
        except (WireError, KeyFileError, ConfigError):
            pass
        _, peak = tracemalloc.get_traced_memory()
        return peak - base
    finally:
        tracemalloc.stop()


def test_chunk_claiming_4_gib_is_refused_without_allocating_it() -> None:
    r = chunking.Reassembler(timeout_s=60)  # default cap: 256 MiB
    chunk = raw_chunk("big", 0, 2, 4 << 30, b"y" * 100)
    with pytest.raises(ChunkError, match="exceeds the reassembly cap"):
        r.add(chunk)
    assert peak_allocation(lambda: chunking.Reassembler().add(chunk)) < MiB
    assert r.stats.malformed == 1 and r.held_bytes == 0


def test_chunk_claiming_4_gib_under_a_larger_cap_holds_only_what_arrived() -> None:
    """Even when the cap allows the claim, nothing is allocated up front."""
    r = chunking.Reassembler(timeout_s=60, max_bytes=8 << 30)
    chunk = raw_chunk("big", 0, chunking.MAX_CHUNKS, 4 << 30, b"y" * 1000)
    assert peak_allocation(lambda: r.add(chunk)) < MiB
    assert r.held_bytes == 1000


def test_a_flood_of_first_chunks_stays_under_the_cap() -> None:
    r = chunking.Reassembler(timeout_s=60, max_bytes=64 * 1024)
    for i in range(2000):
        r.add(raw_chunk(f"m{i}", 0, 2, 2000, b"z" * 1000))
    assert r.held_bytes <= 64 * 1024
    assert r.stats.evicted >= 2000 - 65


def test_many_sites_half_sending_stay_under_the_aggregators_total_cap_and_the_flooder_pays() -> None:
    """Each site's reassembler has its own cap, so many sites (or one flooding) could hold sites x cap;
    the aggregator's total cap evicts from the biggest holder first, and an honest site's message survives."""
    from aggregator.service import enforce_total_cap

    sites = {s: chunking.Reassembler(timeout_s=60, max_bytes=64 * 1024) for s in ("honest", "flood", "quiet")}
    honest = chunking.split(b"h" * 6000, "h1", max_chunk=2000)
    assert sites["honest"].add(honest[0]) is None
    for i in range(40):  # the flooder: first chunks of messages it never finishes
        sites["flood"].add(raw_chunk(f"f{i}", 0, 2, 2000, b"z" * 1000))
    hit = enforce_total_cap(sites, cap=16 * 1024)
    assert set(hit) == {"flood"} and len(hit) >= 40 - 16
    assert sum(r.held_bytes for r in sites.values()) <= 16 * 1024
    assert sites["flood"].stats.evicted == len(hit) and sites["honest"].stats.evicted == 0
    done = [sites["honest"].add(c) for c in honest[1:]]
    assert done[-1] == ("h1", b"h" * 6000)  # the honest update still completes
    assert enforce_total_cap(sites, cap=16 * 1024) == []  # under the cap: nothing to do


def test_the_total_cap_cannot_be_below_one_sites_cap(tmp_path: Path) -> None:
    from tests.aggregator.helpers import SPEC_TOML, make_federation

    fed = make_federation(tmp_path, ["site-a"])
    with pytest.raises(ConfigError, match=r"aggregator: reassembly_total_max_bytes \(1000\) must be at least"):
        fed.config(spec="reassembly_total_max_bytes = 1000\n" + SPEC_TOML)


def test_one_message_cannot_hold_more_than_it_announced() -> None:
    """1000 chunks of 1000 bytes, each claiming to be part of a 1000-byte message:
    the reassembler must refuse what goes beyond the announced total (and its cap).
    Found by this suite; fixed in broker_bridge 04fe77b."""
    r = chunking.Reassembler(timeout_s=60, max_bytes=10_000)
    for i in range(100):
        try:
            r.add(raw_chunk("m", i, 1000, 1000, b"x" * 1000))
        except ChunkError:
            pass
    assert r.held_bytes <= 1000, f"holding {r.held_bytes} bytes for a message of 1000, cap 10000"


def test_tensor_header_claiming_huge_shape_is_refused_without_allocating() -> None:
    meta = json.dumps([{"name": "w", "dtype": "<f8", "shape": [2**31 - 1, 2**31 - 1, 2**31 - 1]}]).encode()
    blob = b"FLT1" + struct.pack("<I", len(meta)) + meta + b"\0" * 64
    with pytest.raises(WireError) as err:
        envelope.decode_tensors(blob)
    assert err.value.reason == "schema"
    assert peak_allocation(lambda: envelope.decode_tensors(blob)) < MiB


def test_flt2_blocks_are_refused_or_read_as_views_without_allocating() -> None:
    """FLT2 names its table by id: an unknown id is refused before any data is read, a known one is read as
    views (the sizes come from the receiver's own layout, never from the block)."""
    unknown = b"FLT2" + b"\xaa" * 16 + b"\0" * (8 * MiB)
    with pytest.raises(WireError, match="not one derived from this party's model spec"):
        envelope.decode_tensors(unknown)
    assert peak_allocation(lambda: envelope.decode_tensors(unknown)) < MiB // 4
    layouts.register_model({"limits.w": (MiB,)})
    known = envelope.encode_tensors({"limits.w": np.zeros(MiB, np.float32)}, by_reference=True)
    assert known[:4] == b"FLT2" and len(known) == 20 + 4 * MiB
    assert peak_allocation(lambda: envelope.decode_tensors(known)) < MiB // 4
    with pytest.raises(WireError, match="trailing bytes"):  # more data than the layout holds: refused
        envelope.decode_tensors(known + b"\0" * MiB)


def test_tensor_block_is_a_view_not_a_copy() -> None:
    big = envelope.encode_tensors({"w": np.zeros(4 * MiB // 4, np.float32)})
    assert peak_allocation(lambda: envelope.decode_tensors(big)) < MiB // 4


@pytest.mark.parametrize(
    "body", [b"[" * 100_000, b'{"a":' * 50_000, b"1" * 5000], ids=["deep-list", "deep-dict", "5000-digits"]
)
def test_signed_documents_refuse_json_bombs_with_wire_errors(body: bytes) -> None:
    """The aggregator's own signature over a hostile body (the worst case: it reaches json.loads)."""
    agg = KeyPair.generate("aggregator", "aggregator")
    blob = envelope.sign_body(envelope._MANIFEST_MAGIC, envelope._MANIFEST_DOMAIN, body, agg)
    with pytest.raises(WireError) as err:
        envelope.verify_manifest(blob, bytes(agg.signing_key.verify_key))
    assert err.value.reason in ("schema", "framing")


KEY_FILE_BOMBS = {
    "deep-list": "[" * 10_000,
    "5000-digit-version": '{"fedline": "enrollment", "version": ' + "1" * 5000 + "}",
}


@pytest.mark.parametrize(
    "loader", [KeyPair.load, PublicKeys.load, Enrollment.load], ids=["keypair", "public", "enrollment"]
)
@pytest.mark.parametrize("text", list(KEY_FILE_BOMBS.values()), ids=list(KEY_FILE_BOMBS))
def test_key_files_with_json_bombs_give_key_file_errors(tmp_path: Path, loader, text: str) -> None:
    """Found by this suite (RecursionError / ValueError escaped); fixed in 438d811."""
    path = tmp_path / "bad.json"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as err:
        loader(path)
    assert str(path) in str(err.value)


def test_site_file_in_latin1_gives_config_error(tmp_path: Path) -> None:
    """A site.toml saved by a Windows editor in Latin-1, with an umlaut in a comment.
    Found by fuzz_site_config (UnicodeDecodeError escaped); fixed in 438d811."""
    from edge.config import load_edge_config

    path = tmp_path / "site.toml"
    path.write_bytes('# Presse 3, Halle Süd\nsite = "press-3"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_edge_config(path)
    assert "site.toml" in str(err.value)


async def test_sparkplug_birth_with_a_non_utf8_metric_name_is_a_bad_sample() -> None:
    """One NBIRTH from a device (or anyone on the plant broker) whose metric name is Latin-1
    must give a bad sample or be skipped, not end the source."""
    from fedline.config import parse
    from firmware_adapters.config import SparkplugConfig
    from firmware_adapters.sparkplug import codec
    from firmware_adapters.sparkplug import sparkplug_b_pb2 as pb
    from firmware_adapters.sparkplug.source import SparkplugSource

    good = codec.build_payload([("Temp", 1, pb.Double, 21.5), ("Cxunt", 2, pb.Int32, 3)], seq=0)
    hostile = good.replace(b"Cxunt", "Zähl".encode("latin-1") + b"x")  # same length, not UTF-8
    assert len(hostile) == len(good)
    source = SparkplugSource(parse(SparkplugConfig, {"kind": "sparkplug", "request_rebirth": False}))
    samples = await source.handle("spBv1.0/g1/NBIRTH/node1", hostile)
    assert all(s.quality in ("good", "bad") for s in samples)
    after = await source.handle("spBv1.0/g1/NDATA/node1", codec.build_payload([(None, 1, pb.Double, 22.0)], seq=1))
    assert after and after[0].values == {"Temp": 22.0}
