"""The generated bridge of a plant broker, run by two real Mosquittos: what crosses, what does not.

The plant broker bridges to the central broker's TLS listener as the plant's
site user. The plant's uplink (logged in to the plant broker) publishes its
update and status to the central aggregator, and receives its receipts, its key
grant and the retained model; another plant's receipts never reach this plant
broker, and the uplink user cannot publish as another plant.
"""

from __future__ import annotations

import asyncio
import stat

import pytest

from broker_bridge.bridge import BridgeConfig
from broker_bridge.client import MqttClient
from broker_bridge.errors import FedlineError, PublishRefused
from broker_bridge.mosquitto import MosquittoConfig, MosquittoProcess, write_broker_config
from broker_bridge.topics import Topics
from tests.conftest import eventually, settings_for

CENTRAL = "central"


def _bridge(central: MosquittoProcess, **kw) -> BridgeConfig:
    return BridgeConfig(
        site="plant-a",
        federation=CENTRAL,
        address=f"127.0.0.1:{central.tls_port}",
        ca_file=central.ca_file,
        password=central.password("plant-a"),
        **kw,
    )


async def _collect(client: MqttClient, into: list[tuple[str, bytes, bool]]) -> None:
    async for m in client.messages():
        into.append((m.topic, m.payload, m.retain))


@pytest.mark.broker
async def test_a_bridged_plant_broker_carries_only_the_plants_own_central_topics(tmp_path):
    t = Topics(CENTRAL)
    central = MosquittoProcess(tmp_path / "central", federation=CENTRAL, sites=["plant-a", "plant-b"])
    plant = None
    try:
        await asyncio.to_thread(central.start)
        # the central state a plant must get: a retained model manifest, published before the bridge exists
        async with MqttClient(settings_for(central, "aggregator")) as agg:
            await agg.wait_connected(10)
            await agg.publish(t.manifest(), b"manifest-v3", qos=1, retain=True)
        plant = MosquittoProcess(tmp_path / "plant", federation="plant-a", sites=["a1"], bridge=_bridge(central))
        assert stat.S_IMODE(plant.paths["conf"].stat().st_mode) == 0o600  # it holds the central password
        await asyncio.to_thread(plant.start)
        seen_central: list = []
        seen_plant: list = []
        async with (
            MqttClient(settings_for(central, "aggregator")) as agg,
            MqttClient(settings_for(plant, "plant-a")) as up,
        ):
            await agg.subscribe(t.updates_filter(), qos=1)
            await agg.subscribe(t.status_filter(), qos=1)
            await up.subscribe(t.receipts("plant-a"), qos=1)
            await up.subscribe(t.fedkey("plant-a"), qos=1)
            await up.subscribe(t.manifest(), qos=1)
            await up.subscribe(f"{t.root}/sites/+/receipts", qos=1)  # the ACL leaves it only its own
            tasks = [asyncio.create_task(_collect(agg, seen_central)), asyncio.create_task(_collect(up, seen_plant))]
            await eventually(lambda: any(x[0] == t.manifest() for x in seen_plant), 20)  # retained, over the bridge
            await up.publish(t.update_chunk("plant-a", "m1", 0), b"sealed-delta", qos=1)
            await up.publish(t.status("plant-a"), b'{"state":"online"}', qos=1, retain=True)
            await eventually(
                lambda: {x[0] for x in seen_central} >= {t.update_chunk("plant-a", "m1", 0), t.status("plant-a")}, 20
            )
            await agg.publish(t.receipts("plant-a"), b"receipt-a", qos=1)
            await agg.publish(t.fedkey("plant-a"), b"grant-a", qos=1, retain=True)
            await agg.publish(t.receipts("plant-b"), b"receipt-b", qos=1)
            await eventually(lambda: {x[1] for x in seen_plant} >= {b"receipt-a", b"grant-a"}, 20)
            # the uplink user cannot speak for another plant on its own broker
            with pytest.raises(PublishRefused):
                await up.publish(t.update_chunk("plant-b", "m2", 0), b"forged", qos=1)
            await asyncio.sleep(1.0)  # what would have crossed by now has
            for task in tasks:
                task.cancel()
        assert b"receipt-b" not in {x[1] for x in seen_plant}
        assert t.update_chunk("plant-b", "m2", 0) not in {x[0] for x in seen_central}
        # retained on the plant side too: a client that subscribes now gets it as a retained message
        late: list = []
        async with MqttClient(settings_for(plant, "plant-a")) as again:
            await again.subscribe(t.manifest(), qos=1)
            task = asyncio.create_task(_collect(again, late))
            await eventually(lambda: late, 20)
            task.cancel()
        assert late[0] == (t.manifest(), b"manifest-v3", True)
    finally:
        if plant is not None:
            plant.stop()
        central.stop()


def test_a_bridge_refuses_what_would_weaken_it(tmp_path):
    base = dict(site="plant-a", federation=CENTRAL, address="central:8883", ca_file="ca.pem", password="pw")
    for bad, needle in (
        ({"ca_file": ""}, "TLS is required"),
        ({"address": "central"}, "host:port"),
        ({"password": "two words"}, "whitespace"),
        ({"site": "plant/a"}, "'/'"),
    ):
        cfg = MosquittoConfig(federation="plant-a", sites=["a1"], bridge=BridgeConfig(**{**base, **bad}))
        with pytest.raises(FedlineError, match=needle):
            write_broker_config(cfg, tmp_path / "out")
    clash = MosquittoConfig(federation="plant-a", sites=["plant-a"], bridge=BridgeConfig(**base))
    with pytest.raises(FedlineError, match="also a user"):
        write_broker_config(clash, tmp_path / "out2")
