"""A receipt is lost on the way back (the broker died after the aggregator decided, or the receipt
publish timed out: ``receipt.unsent``), so the site sends the same update again.

The design's answer: the aggregator recognises the resend and publishes the
same verdict again from its store; the site settles it and moves on. Here the
test is the site, byte for byte as ``edge.agent`` resends: the same sealed
update, chunked under the same message id, on the same topic. It must get a
receipt each time it sends, the second one equal to the first.

Seen for real in the broker kill -9 scenario (tests/faults/test_broker_restart.py):
one update stayed ``sent`` for minutes, resent every ``resend_after_s``,
never answered, because the aggregator's reassembler dropped the resend as a
duplicate of a message it had completed (fixed in aggregator/service.py).
"""

from __future__ import annotations

import asyncio

from broker_bridge.chunking import split
from broker_bridge.client import BrokerSettings, MqttClient
from broker_bridge.envelope import UpdateHeader, open_receipt, seal_update
from broker_bridge.keys import Enrollment, KeyPair
from broker_bridge.topics import Topics
from fedline.config import parse
from fedline.testing.rig import MODEL, FaultRig, RigSettings
from models import ModelSpec, build_model
from models.flat import shared_state
from tests.faults.conftest import record


async def test_resent_update_whose_receipt_was_lost_gets_its_verdict_again(tmp_path) -> None:
    async with FaultRig(tmp_path, ["site-a"], RigSettings(buffer_size=1)) as rig:
        agg = rig.start_aggregator()
        await rig.until(lambda: agg.events("aggregator.started"), 60, "the aggregator is up")
        keys = KeyPair.load(tmp_path / "keys" / "site-a.key")
        enrollment = Enrollment.load(tmp_path / "keys" / "enrollment.json")
        spec = parse(ModelSpec, MODEL)
        delta = {k: v * 0 + 0.01 for k, v in shared_state(build_model(spec, seed=0), spec).items()}
        header = UpdateHeader(
            site="site-a", counter=1, msg_id="u1-resent", base_version=0, n_samples=40, privacy={"mode": "off"}
        )
        blob = seal_update(header, delta, keys, enrollment.aggregator.box_pub)
        topics = Topics(rig.s.federation)
        items = [
            (topics.update_chunk("site-a", header.msg_id, i), c) for i, c in enumerate(split(blob, header.msg_id, 4096))
        ]
        settings = BrokerSettings(
            url=rig.proxies["site-a"].url,
            client_id="site-a-by-hand",
            username="site-a",
            password_file=str(rig.broker.paths["password:site-a"]),
            backoff_min_s=0.1,
            backoff_max_s=0.5,
            timeout_s=5.0,
        )
        receipts: list[dict] = []
        async with MqttClient(settings) as client:
            await client.subscribe(topics.receipts("site-a"), qos=1)
            await client.wait_connected(10)

            async def collect() -> None:
                async for msg in client.messages():
                    receipts.append(open_receipt(msg.payload, keys, enrollment.aggregator.sign_pub))

            task = asyncio.create_task(collect())
            try:
                await client.publish_many(items, qos=1)
                await rig.until(lambda: len(receipts) == 1, 30, "the first receipt")
                await client.publish_many(items, qos=1)  # the receipt was "lost": the site sends it again
                try:
                    await rig.until(lambda: len(receipts) == 2, 15, "a receipt for the resend")
                finally:
                    record(
                        "receipt_lost_resend",
                        receipts=[(r["verdict"], r["version"]) for r in receipts],
                        duplicates_seen_by_aggregator=rig.redeliveries(),
                    )
            finally:
                task.cancel()
        assert (receipts[1]["verdict"], receipts[1]["version"]) == (receipts[0]["verdict"], receipts[0]["version"])
        assert rig.decided() == 1  # one verdict in the store, answered twice
