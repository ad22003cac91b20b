"""Models for members only, over a real Mosquitto: revoking a site starts a new key epoch it cannot read.

The revoked site keeps its broker login here (the broker's ACL is not changed),
which is the strong case: even reading every model topic, it opens nothing
published after its revocation. Also: a retained message a site parks on an
update topic is cleared by the aggregator and counted.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from aggregator.service import Aggregator
from broker_bridge import chunking, envelope
from broker_bridge.client import MqttClient
from broker_bridge.errors import WireError
from broker_bridge.federation_key import Keyring, open_manifest, sealed_manifest_header
from broker_bridge.mosquitto import MosquittoProcess, mosquitto_binary
from broker_bridge.topics import Topics
from fedline.testing.patience import bound
from tests.aggregator.helpers import make_federation, random_delta
from tests.aggregator.test_service_broker import broker_table
from tests.conftest import eventually, settings_for
from tests.members import read_model
from tests.parties import Party

SITES = ["site-a", "site-b", "site-c", "site-d"]


@pytest.fixture
def broker(tmp_path):
    if mosquitto_binary() is None:
        pytest.fail("this test needs the mosquitto broker: apt-get install mosquitto")
    b = MosquittoProcess(tmp_path / "broker", federation="test", sites=SITES).start()
    yield b
    b.stop()


class Capture:
    """Everything one login receives on the given filters, in order."""

    def __init__(self, broker, user: str, filters: list[str]) -> None:
        self.client = MqttClient(settings_for(broker, user, clean_start=True))
        self.filters = filters
        self.messages: list[tuple[str, bytes]] = []

    async def __aenter__(self) -> Capture:
        await self.client.__aenter__()
        for f in self.filters:
            await self.client.subscribe(f)
        await self.client.wait_connected(10)
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        async for m in self.client.messages():
            self.messages.append((m.topic, m.payload))

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await self.client.close()


async def test_revoked_site_reads_nothing_published_after_and_retained_updates_are_cleared(broker, tmp_path):
    fed = make_federation(tmp_path / "fed", SITES)
    # K = 2 (the mean: two slots have no outlier), so the three sites left after the revocation make a version (the
    # buffer awaiting a revoked site: test_a_buffer_awaiting_the_revoked_site_makes_its_version_at_the_revocation)
    path = fed.write_config(
        strategy='kind = "fedbuff"\nbuffer_size = 2', extra="[validation]\nmax_norm = 10.0", broker=broker_table(broker)
    )
    path.write_text(path.read_text().replace("seed = 7\n", "seed = 7\nenrollment_poll_s = 0.2\n"))
    from aggregator.config import load_config

    agg = Aggregator(load_config(path))
    task = asyncio.create_task(agg.run())
    topics = Topics("test")
    agg_pub = fed.agg.public().sign_pub
    d_keys = fed.sites["site-d"]
    try:
        await asyncio.wait_for(agg.started.wait(), bound(120))  # generous: seeding imports torch on a loaded machine
        await eventually(lambda: agg.published_version == 0, 60)
        m0, _, _ = await read_model(broker, topics, d_keys, agg_pub, 0)  # a member reads version 0
        assert m0["epoch"] == 1 and agg.granter.epoch.number == 1

        async with Capture(broker, "site-d", [topics.fedkey("site-d"), topics.model_filter()]) as d_view:
            # both retained messages in (they come in any order; a late manifest of epoch 1 would count as "after")
            await eventually(
                lambda: {topics.fedkey("site-d"), topics.manifest()} <= {t for t, _ in d_view.messages}, 10
            )
            keyring = Keyring()  # everything site-d was ever granted
            for t, p in d_view.messages:
                if t == topics.fedkey("site-d") and p:
                    keyring.add_grant(p, d_keys, agg_pub, "test")
            assert set(keyring) == {1}

            # revoke site-d: `fedline keys revoke` edits the enrollment file; the running aggregator takes it
            n_at_revocation = len(d_view.messages)  # no version is made until the updates below
            enr = fed.enrollment
            enr.revoke("site-d")
            enr.save(fed.root / "enrollment.json")
            await eventually(lambda: agg.granter.epoch.number == 2, 20)

            rng = np.random.default_rng(3)
            a, b, c, d = (Party(broker, s, agg_pub, "test", keys=fed.sites[s]) for s in SITES)
            async with a, b, c, d:
                for p in (a, b, c):
                    blob, h = fed.seal(p.site, random_delta(agg.core.model, rng, 0.1), base_version=0)
                    await p.send(blob, h.msg_id)
                    await eventually(lambda p=p: p.receipts, 20)
                # the revoked site's own update is refused (counted; no receipt: none can be sealed to it)
                blob, h = fed.seal("site-d", random_delta(agg.core.model, rng, 0.1), base_version=0)
                await d.send(blob, h.msg_id)
                await eventually(
                    lambda: agg.metrics.value("fedline_aggregator_rejections_total", {"reason": "unenrolled"}) == 1, 20
                )
                assert d.sealed_receipts == 0
                await eventually(lambda: agg.published_version >= 1, 60)

                # a remaining member reads version 1, under the new epoch
                m1, _, _ = await read_model(broker, topics, fed.sites["site-a"], agg_pub, 1)
                assert m1["epoch"] == 2 and m1["version"] == 1
                assert set(m1) == {"federation", "version", "epoch", "created_at", "spec", "weights", "onnx", "reads"}

                # a retained update chunk (data parked in the broker's store) is cleared and counted
                blob, h = fed.seal("site-a", random_delta(agg.core.model, rng, 0.1), base_version=1)
                chunks = chunking.split(blob, h.msg_id, 1 << 20)
                assert len(chunks) == 1
                await a.client.publish(topics.update_chunk("site-a", h.msg_id, 0), chunks[0], retain=True)
                await eventually(
                    lambda: (
                        agg.metrics.value("fedline_aggregator_retained_updates_cleared_total", {"site": "site-a"}) == 1
                    ),
                    20,
                )
                async with Capture(broker, "observer", [topics.updates_filter()]) as late:
                    await asyncio.sleep(1.0)
                assert late.messages == []  # nothing retained is left on any update topic
            await asyncio.sleep(0.5)
            after = d_view.messages[n_at_revocation:]
    finally:
        agg.stop()
        await asyncio.wait_for(task, bound(30))

    # what site-d received after its revocation: its grant cleared, and ciphertext it cannot open
    grants_after = [p for t, p in after if t == topics.fedkey("site-d")]
    assert grants_after == [b""]
    manifests = [p for t, p in after if t == topics.manifest() and p]
    assert manifests and all(sealed_manifest_header(p)[0] == 2 for p in manifests)
    for p in manifests:
        with pytest.raises(WireError) as exc:
            open_manifest(p, keyring, agg_pub)
        assert exc.value.reason == "epoch"
    weights = chunking.Reassembler()
    blobs = [
        done[1] for t, p in after if topics.parse(t).kind == "weights" and p and (done := weights.add(p)) is not None
    ]
    assert blobs  # version 1's weights went past site-d
    for blob in blobs:
        with pytest.raises(WireError):
            envelope.open_for_federation(blob, keyring[1])
    with pytest.raises(WireError):  # not even by forcing the old epoch number onto the new manifest
        open_manifest(manifests[-1][:4] + (1).to_bytes(4, "little") + manifests[-1][8:], keyring, agg_pub)


async def test_a_buffer_awaiting_the_revoked_site_makes_its_version_at_the_revocation(broker, tmp_path):
    """The defaults at four sites: MDA awaits all four (K + f) and keeps three. Three have sent when site-d is revoked:
    the running aggregator takes the new enrollment, sizes the strategy for three sites (the mean of all three,
    ``min_sites`` = 3) and makes the version at once, without any timeout (there is none by default). Before, the
    buffer waited for site-d forever. Hand-worked: deltas of 0.03, 0.06 and 0.09 in every shared parameter, the
    0.09 clipped to the median norm (0.06), step (0.03 + 0.06 + 0.06) / 3 = 0.05 everywhere
    (``tests/aggregator/test_enrollment_resize.py``)."""
    fed = make_federation(tmp_path / "fed", SITES)
    path = fed.write_config(strategy="min_sites = 3", broker=broker_table(broker))
    path.write_text(path.read_text().replace("seed = 7\n", "seed = 7\nenrollment_poll_s = 0.2\n"))
    from aggregator.config import load_config

    agg = Aggregator(load_config(path))
    task = asyncio.create_task(agg.run())
    topics = Topics("test")
    agg_pub = fed.agg.public().sign_pub
    try:
        await asyncio.wait_for(agg.started.wait(), bound(120))
        assert agg.core.strategy.arrivals == 4 and agg.core.strategy.reduce_stat == "mda"
        v0 = {k: v.copy() for k, v in agg.core.model.items()}
        a, b, c = (Party(broker, s, agg_pub, "test", keys=fed.sites[s]) for s in SITES[:3])
        async with a, b, c:
            for p, value in zip((a, b, c), (0.03, 0.06, 0.09)):
                delta = {k: np.full(v.shape, value, np.float32) for k, v in v0.items()}
                blob, h = fed.seal(p.site, delta, base_version=0)
                await p.send(blob, h.msg_id)
                await eventually(lambda p=p: [r["verdict"] for r in p.receipts] == ["buffered"], 20)
            await asyncio.sleep(0.5)  # three polls of the enrollment file: nothing changes without the revocation
            assert agg.core.version == 0

            enr = fed.enrollment
            enr.revoke("site-d")
            enr.save(fed.root / "enrollment.json")
            for p in (a, b, c):
                await eventually(lambda p=p: [r["verdict"] for r in p.receipts] == ["buffered", "applied"], 20)
            assert agg.core.strategy.arrivals == 3 and agg.core.strategy.reduce_stat == "mean"
            m1, weights, _ = await read_model(broker, topics, fed.sites["site-a"], agg_pub, 1)
            assert m1["version"] == 1 and m1["epoch"] == 2  # published under the epoch site-d was not granted
            for k, v in v0.items():
                np.testing.assert_allclose(weights[k], v + 0.05, rtol=0, atol=1e-6)
            assert [u["weight"] for u in agg.core.lineage(1)["updates"]] == [pytest.approx(1 / 3)] * 3
    finally:
        agg.stop()
        await asyncio.wait_for(task, bound(30))
