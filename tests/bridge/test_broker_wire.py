"""Sealed updates across a real Mosquitto: 10 MB in chunks, shuffled and duplicated,
and every kind of bad message refused by reason while good ones keep flowing."""

from __future__ import annotations

import random

import numpy as np
import pytest

from broker_bridge.chunking import split
from broker_bridge.client import MqttClient
from broker_bridge.topics import Topics
from tests.bridge import helpers as h
from tests.conftest import eventually, settings_for

T = Topics("test")
pytestmark = pytest.mark.timeout(60)  # a hung broker test fails in a minute, not at the suite limit
TEN_MB_PARAMS = 10 * 1024 * 1024 // 4  # float32 parameters in 10 MiB


async def _connected_pair(broker, site: str = "site-a", protocol: str = "5"):
    agg = MqttClient(settings_for(broker, "aggregator", client_id="agg-rx", protocol=protocol))
    snd = MqttClient(settings_for(broker, site, client_id=f"{site}-tx", protocol=protocol))
    await agg.__aenter__()
    await snd.__aenter__()
    await agg.wait_connected(10)
    await agg.subscribe(T.updates_filter())
    await snd.wait_connected(10)
    return agg, snd


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_ten_megabyte_update_crosses_the_broker_bit_exact(mosquitto, protocol: str) -> None:
    fed = h.make_federation()
    head, tensors, blob = h.seal(fed, "site-a", 1, n_params=TEN_MB_PARAMS, seed=11)
    assert tensors["layer.weight"].nbytes == 10 * 1024 * 1024
    agg, site = await _connected_pair(mosquitto, protocol=protocol)
    rx = h.Receiver(fed)
    task = rx.start(agg)
    try:
        limit = site.chunk_limit(T.update_chunk("site-a", head.msg_id, 999))
        assert limit == 100 * 1024
        items = h.chunk_items(T, "site-a", head.msg_id, blob, limit)
        assert len(items) > 100 and all(len(p) <= limit for _, p in items)
        await site.publish_many(items)
        await eventually(lambda: rx.accepted, timeout=30)
        got_head, got, got_blob = rx.accepted[0]
        assert got_blob == blob
        assert got_head == head
        for name, arr in tensors.items():
            assert got[name].tobytes() == arr.tobytes()
        assert not rx.rejected
        assert site.stats.published == len(items) and site.stats.refused == 0
    finally:
        await h.stop(task)
        await agg.close()
        await site.close()


async def test_shuffled_and_duplicated_chunks_still_open_bit_exact(mosquitto) -> None:
    fed = h.make_federation()
    rng = random.Random(5)
    sealed = [h.seal(fed, "site-a", c, n_params=TEN_MB_PARAMS // 2, seed=c) for c in (1, 2)]
    items = []
    for head, _, blob in sealed:
        items += h.chunk_items(T, "site-a", head.msg_id, blob)
    n_unique = len(items)
    items += rng.sample(items, n_unique // 2)  # half again as duplicates
    rng.shuffle(items)  # and both messages interleaved in random order
    agg, site = await _connected_pair(mosquitto)
    rx = h.Receiver(fed)
    task = rx.start(agg)
    try:
        await site.publish_many(items)
        await eventually(
            lambda: len(rx.accepted) == 2 and rx.reassembler.stats.duplicates == len(items) - n_unique, timeout=30
        )
        got = {hd.counter: (hd, t, b) for hd, t, b in rx.accepted}
        for head, tensors, blob in sealed:
            assert got[head.counter][2] == blob
            np.testing.assert_array_equal(got[head.counter][1]["layer.weight"], tensors["layer.weight"])
        assert not rx.rejected
    finally:
        await h.stop(task)
        await agg.close()
        await site.close()


async def test_bad_messages_are_refused_by_reason_and_the_receiver_keeps_going(mosquitto) -> None:
    fed = h.make_federation()  # site-c can log in to the broker but is not enrolled
    agg, site_a = await _connected_pair(mosquitto)
    site_c = MqttClient(settings_for(mosquitto, "site-c", client_id="site-c-tx"))
    await site_c.__aenter__()
    rx = h.Receiver(fed)
    task = rx.start(agg)
    try:
        await site_c.wait_connected(10)
        _, _, first = h.seal(fed, "site-a", 1)
        await site_a.publish_many(h.chunk_items(T, "site-a", "good1", first, 4096))
        await eventually(lambda: len(rx.accepted) == 1)

        _, _, later = h.seal(fed, "site-a", 2)
        chunks_later = h.chunk_items(T, "site-a", "later", later, 4096)
        truncated = list(chunks_later)
        truncated[1] = (truncated[1][0], truncated[1][1][:-50])
        bad = {
            "version": h.wrong_version(later),
            "tampered": h.tampered(later),
            "forged": h.forged_signature(fed, "site-a", 3),
            "nosig": h.missing_signature(fed, "site-a", 3),
            "impostor": h.impostor(fed, signer="site-b", claimed="site-a", counter=3),
            "schema": h.bad_schema(fed, "site-a", 3),
            "replay": first,  # the first update again, under a new message id
            "garbage": random.Random(1).randbytes(3000),
        }
        items = []
        for name, blob in bad.items():
            items += h.chunk_items(T, "site-a", f"bad-{name}", blob, 4096)
        items += [
            (T.update_chunk("site-a", "junk", 0), b"\x00garbage that is no chunk at all"),
            (T.update_chunk("site-a", "junk", 1), b""),
        ]
        await site_a.publish_many(items)
        await site_a.publish_many(truncated)
        _, _, revoked = h.seal(fed, "site-c", 1)
        await site_c.publish_many(h.chunk_items(T, "site-c", "c1", revoked, 4096))

        expected = {
            ("open", "version"): 1,
            ("open", "decrypt"): 1,
            ("open", "signature"): 2,
            ("open", "unenrolled"): 2,
            ("open", "schema"): 1,
            ("open", "replay"): 1,
            ("open", "framing"): 1,  # garbage that was chunked properly
            ("chunk", "framing"): 3,
        }  # two raw junk payloads and the truncated message
        await eventually(lambda: rx.rejected == expected, timeout=15)
        assert len(rx.accepted) == 1

        # the truncated update is resent whole, then a fresh one: both get through
        await site_a.publish_many(chunks_later)
        _, _, third = h.seal(fed, "site-a", 3)
        await site_a.publish_many(h.chunk_items(T, "site-a", "good3", third, 4096))
        await eventually(lambda: [a[0].counter for a in rx.accepted] == [1, 2, 3])
        assert rx.rejected == expected
        assert not task.done()
    finally:
        await h.stop(task)
        await site_c.close()
        await agg.close()
        await site_a.close()


def test_chunk_helper_keeps_under_the_limit() -> None:
    """Guard for the tests above: chunk_items produces topics the aggregator's filter matches."""
    items = h.chunk_items(T, "site-a", "m", b"x" * 10_000, 2048)
    assert len(items) == len(split(b"x" * 10_000, "m", 2048))
    assert all(T.parse(t).kind == "update" and len(p) <= 2048 for t, p in items)
