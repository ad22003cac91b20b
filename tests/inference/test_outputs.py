"""Predictions and alarms on the plant's MQTT broker, rollback by command topic, Prometheus /metrics."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

from broker_bridge.client import BrokerSettings, MqttClient
from broker_bridge.mosquitto import free_port
from edge.inference.model_dir import publish_model
from edge.inference.service import InferenceService
from fedline.testing.patience import bound
from tests.conftest import eventually
from tests.inference.conftest import TRUE_B, TRUE_W, RowStream, make_config
from tests.inference.onnx_models import linear_onnx


async def test_mqtt_output_command_rollback_and_metrics(
    tmp_path: Path, plant_broker: str, site_keys, aggregator_keys
) -> None:
    port = free_port()
    cfg = make_config(
        tmp_path,
        {"command_topic": "plant/site-a/infer/command", "site_key": "site-a.key", "aggregator_key": "aggregator.pub"},
        output={
            "file": "predictions.jsonl",
            "topic": "plant/site-a/predictions",
            "alarm_topic": "plant/site-a/alarms",
            "threshold": 0.5,
            "qos": 1,
            "broker": {"url": plant_broker, "backoff_min_s": 0.05, "backoff_max_s": 0.5},
        },
        metrics={"port": port},
    )
    publish_model(tmp_path / "models", linear_onnx(TRUE_W, TRUE_B), 1)
    stream = RowStream(seed=9, per_tick=5, tick_s=0.005)
    received: dict[str, list[dict]] = {"predictions": [], "alarms": []}
    settings = BrokerSettings(url=plant_broker, client_id="plant-hmi", clean_start=True, backoff_min_s=0.05)
    async with MqttClient(settings) as hmi:
        await hmi.subscribe("plant/site-a/predictions")
        await hmi.subscribe("plant/site-a/alarms")
        await hmi.wait_connected(10)

        async def collect() -> None:
            async for m in hmi.messages():
                received[m.topic.rsplit("/", 1)[1]].append(json.loads(m.payload))

        collector = asyncio.create_task(collect())
        service = InferenceService(cfg, rows=stream)
        task = asyncio.create_task(service.run())
        await eventually(lambda: service.current_version() == 1)
        publish_model(tmp_path / "models", linear_onnx(TRUE_W * 2, TRUE_B * 2), 2)
        await eventually(lambda: service.current_version() == 2)

        metrics = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        )
        assert "fedline_infer_model_version 2.0" in metrics
        assert "fedline_infer_predictions_total" in metrics
        assert "process_resident_memory_bytes" in metrics and "process_cpu_seconds_total" in metrics

        # commands must be signed by the site's or the aggregator's key: anyone on the plant broker is refused
        from broker_bridge.keys import KeyPair
        from broker_bridge.line_command import sign_command

        topic = "plant/site-a/infer/command"
        await hmi.publish(topic, b"reboot please")
        await eventually(lambda: service.stats.refused["command"] == 1)
        await hmi.publish(topic, b'{"command": "rollback"}')  # the old unsigned form
        await eventually(lambda: service.stats.refused["command"] == 2)
        stranger = KeyPair.generate("site", "site-a")  # right name, wrong key
        await hmi.publish(topic, sign_command("rollback", "test", "site-a", stranger))
        await eventually(lambda: service.stats.refused["command"] == 3)
        await hmi.publish(topic, sign_command("rollback", "test", "site-b", site_keys))  # another site's line
        await eventually(lambda: service.stats.refused["command"] == 4)
        old = sign_command("rollback", "test", "site-a", site_keys, issued_at=time.time() - 3600)
        await hmi.publish(topic, old)  # stale: a captured command replayed an hour later
        await eventually(lambda: service.stats.refused["command"] == 5)
        assert service.current is not None and service.current.version == 2
        signed = sign_command("rollback", "test", "site-a", site_keys)
        await hmi.publish(topic, signed)
        await eventually(lambda: service.current is not None and service.current.version == 1)
        assert [s.kind for s in service.stats.swaps][-1] == "rollback"
        await hmi.publish(topic, signed)  # the same command again: a replay
        await eventually(lambda: service.stats.refused["command"] == 6)
        n = service.stats.predictions
        await eventually(lambda: service.stats.predictions > n + 50)
        stream.stop()
        await asyncio.wait_for(task, bound(20))
        await eventually(lambda: len(received["predictions"]) == service.stats.predictions)
        collector.cancel()

    preds = received["predictions"]
    assert [p["seq"] for p in preds] == list(range(len(stream.xs)))
    assert {p["version"] for p in preds} == {1, 2}
    assert received["alarms"] == [p for p in preds if p["alarm"]] and received["alarms"]
    on_file = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert on_file == preds
