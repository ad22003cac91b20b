"""split(digest=False): a forward's chunks carry no digest; a reassembler that does not check one joins them."""

from __future__ import annotations

import os

import pytest

from broker_bridge.chunking import ChunkError, Reassembler, parse_chunk, split


def test_chunks_without_a_digest_join_where_the_digest_is_not_checked_and_fail_where_it_is() -> None:
    blob = os.urandom(250_000)
    parts = split(blob, "m1", 64 * 1024, digest=False)
    assert len(parts) == 4 and all(parse_chunk(p).digest == bytes(16) for p in parts)
    lenient = Reassembler(check_digest=False)
    assert [lenient.add(p) for p in parts][-1] == ("m1", blob)
    strict = Reassembler()
    with pytest.raises(ChunkError, match="wrong digest"):
        for p in parts:
            strict.add(p)
    assert split(blob, "m1", 64 * 1024)[0] != parts[0]  # the default still carries the digest
