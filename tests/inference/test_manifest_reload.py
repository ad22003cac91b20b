"""Hot reload from the aggregator's signed manifest over a real Mosquitto, with real onnxruntime.

The aggregator is played by the test: it has its own KeyPair, logs in as the
broker's ``aggregator`` user and publishes retained ONNX chunks and a signed
manifest exactly as the wire contract says. The line logs in as ``site-a``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np

from broker_bridge.client import MqttClient
from broker_bridge.keys import KeyPair
from edge.inference.service import InferenceService
from fedline.testing.patience import bound
from tests.conftest import eventually, settings_for
from tests.inference.conftest import TRUE_B, TRUE_W, Aggregator, RowStream, broker_table, make_config
from tests.inference.onnx_models import linear_onnx, linear_score


def manifest_config(tmp_path: Path, mosquitto, **line):
    return make_config(
        tmp_path,
        {"model_source": "manifest", "aggregator_key": "aggregator.pub", "site_key": "site-a.key", **line},
        broker=broker_table(settings_for(mosquitto, "site-a", client_id="site-a-infer")),
    )


async def test_ten_reloads_under_a_steady_stream(
    tmp_path: Path, mosquitto, aggregator_keys: KeyPair, site_keys: KeyPair
) -> None:
    rng = np.random.default_rng(7)
    weights = {v: rng.normal(0, 2, 4) for v in range(1, 11)}
    cfg = manifest_config(tmp_path, mosquitto, batch_max=16)
    stream = RowStream(seed=11, labelled=False)
    service = InferenceService(cfg, rows=stream)
    task = asyncio.create_task(service.run())
    async with MqttClient(settings_for(mosquitto, "aggregator")) as agg_client:
        agg = Aggregator(agg_client, aggregator_keys, site_keys)
        for v in range(1, 11):
            await agg.publish(v, linear_onnx(weights[v], 0.1 * v))
            await eventually(lambda: service.current_version() == v)
            n = service.stats.predictions
            await eventually(lambda: service.stats.predictions > n + 40)  # the new version scores a while
    stream.stop()
    await asyncio.wait_for(task, bound(20))

    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    # every sample scored exactly once, in order
    assert [p["seq"] for p in preds] == list(range(len(stream.xs)))
    # ten reloads, each serving from a known sample on
    swaps = service.stats.swaps
    assert [s.version for s in swaps] == list(range(1, 11)) and all(s.kind == "reload" for s in swaps)
    assert swaps[0].first_seq == 0
    bounds = [s.first_seq for s in swaps] + [len(preds)]
    for i, s in enumerate(swaps):
        chunk = preds[bounds[i] : bounds[i + 1]]
        assert chunk and {p["version"] for p in chunk} == {s.version}
    # each score is the one the logged version computes for that sample
    for p in preds:
        want = linear_score(weights[p["version"]], 0.1 * p["version"], stream.xs[p["seq"]])
        assert abs(p["score"] - want) < 1e-5, p
    assert service.stats.refused == {} and all(s.seconds > 0 for s in swaps)


async def test_bad_models_are_refused_and_the_old_one_keeps_scoring(
    tmp_path: Path, mosquitto, aggregator_keys: KeyPair, site_keys: KeyPair
) -> None:
    good = linear_onnx(TRUE_W * 3, TRUE_B * 3)
    cfg = manifest_config(tmp_path, mosquitto, canary={"min_rows": 64, "margin": 0.05})
    stream = RowStream(seed=5, labelled=True)
    service = InferenceService(cfg, rows=stream)
    task = asyncio.create_task(service.run())

    async def refused_while_scoring(reason: str, count: int = 1) -> None:
        n = service.stats.predictions
        await eventually(lambda: service.stats.refused[reason] == count)
        await eventually(lambda: service.stats.predictions > n + 100)
        assert service.current is not None and service.current.version == 1

    async with MqttClient(settings_for(mosquitto, "aggregator")) as agg_client:
        agg = Aggregator(agg_client, aggregator_keys, site_keys)
        await agg.publish(1, good)
        await eventually(lambda: service.current_version() == 1 and len(service.scorer.canary) >= 64)

        # forged manifest: a well-formed model signed by another key
        forger = KeyPair.generate("aggregator", "aggregator")
        await agg.publish(2, linear_onnx(TRUE_W * 4, TRUE_B * 4), signer=forger)
        await refused_while_scoring("signature")
        # truncated ONNX, hash and signature consistent (a broken export): onnxruntime cannot load it
        await agg.publish(3, good[: len(good) - 40])
        await refused_while_scoring("load")
        # the chunks carry other bytes than the manifest names (truncated in transit or tampered)
        await agg.publish(4, linear_onnx(TRUE_W * 4, TRUE_B * 4), chunk_blob=good[:200])
        await refused_while_scoring("hash")
        # a model for another input width
        await agg.publish(5, linear_onnx(np.ones(3)))
        await refused_while_scoring("width")
        # a model that is worse on the recent labelled rows
        await agg.publish(6, linear_onnx(-TRUE_W * 3, -TRUE_B * 3))
        await refused_while_scoring("canary")
        # a manifest for another federation, signed by the right key
        await agg.publish(7, good, federation="other")
        await refused_while_scoring("schema")
        # garbage on the manifest topic and a chunk that is no chunk: counted, dropped
        await agg_client.publish(agg.topics.manifest(), b"\x00garbage manifest")
        await agg_client.publish(agg.topics.onnx_chunk(9, 0), b"not a chunk")
        await refused_while_scoring("framing", 2)
        # an older, validly signed manifest replayed is ignored, not refused
        await agg.publish(1, good)
        # and a good model is still taken after all that
        await agg.publish(8, linear_onnx(TRUE_W * 3.2, TRUE_B * 3.2))
        await eventually(lambda: service.current_version() == 8)
    stream.stop()
    await asyncio.wait_for(task, bound(20))

    assert dict(service.stats.refused) == {
        "signature": 1,
        "load": 1,
        "hash": 1,
        "width": 1,
        "canary": 1,
        "schema": 1,
        "framing": 2,
    }
    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [p["seq"] for p in preds] == list(range(len(stream.xs)))
    assert {p["version"] for p in preds} == {1, 8}
    assert [s.version for s in service.stats.swaps] == [1, 8]
    text = service.metrics.registry.get_sample_value
    assert text("fedline_infer_refused_total", {"reason": "canary"}) == 1.0
    assert text("fedline_infer_model_version") == 8.0


async def test_broker_outage_does_not_stop_scoring(
    tmp_path: Path, mosquitto, aggregator_keys: KeyPair, site_keys: KeyPair
) -> None:
    cfg = manifest_config(tmp_path, mosquitto)
    stream = RowStream(seed=2, labelled=False)
    service = InferenceService(cfg, rows=stream)
    task = asyncio.create_task(service.run())
    async with MqttClient(settings_for(mosquitto, "aggregator")) as agg_client:
        agg = Aggregator(agg_client, aggregator_keys, site_keys)
        await agg.publish(1, linear_onnx(TRUE_W, TRUE_B))
        await eventually(lambda: service.current_version() == 1)
        mosquitto.stop()
        n = service.stats.predictions
        await eventually(lambda: service.stats.predictions > n + 300)  # the line scores on without a broker
        mosquitto.start()
        await agg.publish(2, linear_onnx(TRUE_W * 2, TRUE_B))  # after both clients reconnect by themselves
        await eventually(lambda: service.current_version() == 2)
    stream.stop()
    await asyncio.wait_for(task, bound(20))
    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [p["seq"] for p in preds] == list(range(len(stream.xs)))
    assert [s.version for s in service.stats.swaps] == [1, 2]
