"""A site's key is rotated, end to end over a real Mosquitto with the real aggregator service (issue 14).

An update sealed with the old key is still in the site's outbox when the enrollment changes: the aggregator
refuses it with a clear reason (``unenrolled``: signed by another key), the receipt (sealed to the site's new
key) settles it by message id, so nothing is resent forever; the site's next update, sealed with the new key,
is applied. The rotation also starts a new key epoch: the old key opens neither the new grant nor what is
published after (whoever copied the old key kept the old content key only).
"""

from __future__ import annotations

import asyncio

import pytest

from aggregator.config import load_config
from aggregator.service import Aggregator
from broker_bridge.errors import WireError
from broker_bridge.federation_key import open_grant
from broker_bridge.keys import Enrollment, KeyPair
from edge.agent import EdgeAgent
from edge.config import load_edge_config
from tests.conftest import eventually, settings_for
from tests.edge.helpers import FEDERATION, Federation, write_aggregator, write_csv, write_site


async def test_rotated_key_old_updates_refused_with_a_reason_nothing_wedged_new_ones_applied(
    mosquitto, tmp_path
) -> None:
    fed = Federation.create(tmp_path, ["site-a"])
    toml = tmp_path / "aggregator.toml"
    write_aggregator(fed, mosquitto, toml)
    toml.write_text(
        toml.read_text().replace("seed = 0\n", "seed = 0\nenrollment_poll_s = 0.2\n") + "[publish]\nonnx = false\n"
    )
    aggregator = Aggregator(load_config(toml))
    agg_task = asyncio.create_task(aggregator.run())
    await asyncio.wait_for(aggregator.started.wait(), 30)
    path = write_site(
        fed, "site-a", write_csv(tmp_path / "rows.csv", 150), mosquitto.url, mosquitto.paths["password:site-a"]
    )
    stop = asyncio.Event()
    try:
        old = EdgeAgent(load_edge_config(path))
        task = asyncio.create_task(old.run(stop))
        await eventually(lambda: old.sources_done and old.base.manifest, 60)
        assert await old.train_once() is not None
        await eventually(lambda: old.outbox.depth()[0] == 0, 60)
        stop.set()
        await asyncio.wait_for(task, 60)
        assert await old.train_once() is not None  # sealed with the old key, never sent before the rotation
        (stale_row,) = old.outbox.rows()
        old.close()
        epoch_before = aggregator.granter.epoch.number

        # the rotation of deploy/README.md: a new key on the gateway, its public part enrolled in its place
        old_keys = fed.sites["site-a"]
        new_keys = KeyPair.generate("site", "site-a")
        new_keys.save(tmp_path / "keys" / "site-a.key")
        enr = Enrollment.load(fed.enrollment_path)
        enr.add(new_keys.public())
        enr.save(fed.enrollment_path)
        await eventually(lambda: aggregator.granter.epoch.number == epoch_before + 1, 60)  # a new key epoch

        stop = asyncio.Event()
        new = EdgeAgent(load_edge_config(path))
        task = asyncio.create_task(new.run(stop))
        await eventually(lambda: new.outbox.depth()[0] == 0, 60)  # the old-key row is settled, not resent forever
        refused = next(e for e in new.outbox.ledger() if e.msg_id == stale_row.msg_id)
        assert (refused.state, refused.reason) == ("rejected", "unenrolled")
        assert "unenrolled" in (new.last_error or "")
        # the new epoch's grant, and the current version re-published under it (the new key opens nothing older)
        await eventually(lambda: max(new.keyring, default=0) == epoch_before + 1, 60)
        await eventually(lambda: new.base.version == aggregator.core.version, 60)
        assert await new.train_once() is not None  # sealed with the new key
        await eventually(lambda: new.outbox.depth()[0] == 0, 60)
        last = new.outbox.ledger()[-1]
        assert last.counter == stale_row.counter + 1 and last.state == "applied"
        assert aggregator.metrics.value("fedline_aggregator_rejections_total", {"reason": "unenrolled"}) >= 1

        # the old key (perhaps copied: why keys are rotated) opens neither the new grant nor the new models
        grant = await read_retained(mosquitto, f"fedline/{FEDERATION}/sites/site-a/fedkey")
        with pytest.raises(WireError) as refused_grant:
            open_grant(grant, old_keys, fed.aggregator.public().sign_pub, FEDERATION)
        assert refused_grant.value.reason == "decrypt"  # sealed to the new key only
        stop.set()
        await asyncio.wait_for(task, 60)
        new.close()
    finally:
        stop.set()
        aggregator.stop()
        await asyncio.wait_for(agg_task, 60)


async def read_retained(broker, topic: str) -> bytes:
    """The retained message on ``topic``, read as site-a."""
    from broker_bridge.client import MqttClient

    async def first(c: MqttClient) -> bytes:
        async for m in c.messages():
            if m.payload:
                return bytes(m.payload)
        raise AssertionError(f"nothing retained on {topic}")

    async with MqttClient(settings_for(broker, "site-a", clean_start=True)) as c:  # the ACL: only site-a reads it
        await c.subscribe(topic, qos=1)
        return await asyncio.wait_for(first(c), 10)
