"""Last will and retained liveness of the aggregator and of a line, on a real Mosquitto.

Each service reaches the broker's TLS listener through a TCP proxy the test can cut:
the broker then sees a lost connection and publishes the service's will (retained);
after the link returns the service says ``online`` again; a clean stop says ``stopped``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

from aggregator.service import Aggregator
from broker_bridge.client import MqttClient
from broker_bridge.keys import KeyPair
from broker_bridge.topics import Topics
from edge.inference.service import InferenceService
from fedline.netproxy import TcpProxy
from fedline.testing.patience import bound
from tests.aggregator.helpers import make_federation
from tests.conftest import eventually, settings_for
from tests.inference.conftest import Aggregator as FakeAggregator
from tests.inference.conftest import (  # noqa: F401 (fixtures used by name)
    RowStream,
    aggregator_keys,
    broker_table,
    make_config,
    site_keys,
)
from tests.inference.onnx_models import linear_onnx

T = Topics("test")


class Watch:
    """The observer's view of services/+/status: the latest document per service user."""

    def __init__(self, broker) -> None:
        self.client = MqttClient(settings_for(broker, "observer", clean_start=True))
        self.latest: dict[str, dict] = {}
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Watch:
        await self.client.__aenter__()
        await self.client.subscribe(T.service_status_filter())

        async def run() -> None:
            async for m in self.client.messages():
                if m.payload:
                    self.latest[T.parse(m.topic).site or ""] = json.loads(m.payload)

        self._task = asyncio.create_task(run())
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._task is not None
        self._task.cancel()
        await self.client.__aexit__(None, None, None)

    def state(self, user: str) -> dict:
        return self.latest.get(user, {})


async def test_line_liveness_and_will(tmp_path, mosquitto, aggregator_keys: KeyPair, site_keys: KeyPair) -> None:
    proxy = await TcpProxy(mosquitto.tls_port).start()
    line_settings = replace(settings_for(mosquitto, "site-a.line"), url=proxy.url.replace("mqtt:", "mqtts:"))
    # the line user site-a.line reads its site's key grant (the models are sealed to the members)
    cfg = make_config(
        tmp_path,
        {"model_source": "manifest", "aggregator_key": "aggregator.pub", "site_key": "site-a.key"},
        broker=broker_table(line_settings),
    )
    stream = RowStream(seed=3, labelled=False)
    service = InferenceService(cfg, rows=stream)
    async with Watch(mosquitto) as watch, MqttClient(settings_for(mosquitto, "aggregator")) as agg_client:
        task = asyncio.create_task(service.run())
        await FakeAggregator(agg_client, aggregator_keys, site_keys).publish(1, linear_onnx([1.0, 0.0, 0.0, 0.0], 0.0))
        await eventually(lambda: watch.state("site-a.line") == {"service": "line", "state": "online", "version": 1}, 20)
        proxy.cut()  # the broker loses the line's connection: it publishes the will
        await eventually(lambda: watch.state("site-a.line").get("reason") == "connection lost", 20)
        assert watch.state("site-a.line")["state"] == "offline"
        proxy.restore()
        await eventually(lambda: watch.state("site-a.line").get("state") == "online", 30)
        stream.stop()
        await asyncio.wait_for(task, bound(20))
        await eventually(lambda: watch.state("site-a.line").get("reason") == "stopped", 10)
    await proxy.stop()


async def test_aggregator_liveness_and_will(tmp_path, mosquitto) -> None:
    fed = make_federation(tmp_path / "fed", ["site-a", "site-b", "site-c"])
    proxy = await TcpProxy(mosquitto.tls_port).start()
    table = (
        f'[broker]\nurl = "{proxy.url.replace("mqtt:", "mqtts:")}"\nca_file = "{mosquitto.ca_file}"\n'
        f'username = "aggregator"\npassword = "{mosquitto.password("aggregator")}"\n'
        "backoff_min_s = 0.05\nbackoff_max_s = 0.5\n"
    )
    agg = Aggregator(fed.config(broker=table))
    async with Watch(mosquitto) as watch:
        task = asyncio.create_task(agg.run())
        await eventually(lambda: watch.state("aggregator").get("version") == 0, 120)
        # three enrolled sites, defaults: K = 3, so the reduce in force is MDA (robust = "auto")
        assert watch.state("aggregator") == {
            "service": "aggregator",
            "state": "online",
            "version": 0,
            "reduce": "mda",
        }
        proxy.cut()
        await eventually(lambda: watch.state("aggregator").get("reason") == "connection lost", 20)
        proxy.restore()
        await eventually(lambda: watch.state("aggregator").get("state") == "online", 30)
        agg.stop()
        await asyncio.wait_for(task, bound(30))
        await eventually(lambda: watch.state("aggregator").get("reason") == "stopped", 10)
    await proxy.stop()
