"""Hot reload from the model directory the edge agent writes, rollback and restart (real onnxruntime)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np

from broker_bridge.envelope import content_hash
from edge.inference.model_dir import POINTER, atomic_write, publish_model
from edge.inference.service import InferenceService
from edge.inference.state import StateDir
from fedline.testing.patience import bound
from tests.conftest import eventually
from tests.inference.conftest import TRUE_B, TRUE_W, RowStream, make_config
from tests.inference.onnx_models import linear_onnx, linear_score


def read_predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def start(service: InferenceService) -> asyncio.Task:
    task = asyncio.create_task(service.run())
    return task


async def test_model_dir_reloads_refusals_and_rollback(tmp_path: Path) -> None:
    models = tmp_path / "models"
    weights = {v: TRUE_W * (1 + 0.1 * v) for v in range(1, 5)}
    blobs = {v: linear_onnx(w, TRUE_B) for v, w in weights.items()}
    publish_model(models, blobs[1], 1)
    cfg = make_config(tmp_path, {"canary": {"min_rows": 16, "margin": 0.05}})
    stream = RowStream(seed=3)
    service = InferenceService(cfg, rows=stream)
    task = await start(service)
    await eventually(lambda: service.current_version() == 1 and service.stats.predictions > 50)

    # a good new version is taken
    publish_model(models, blobs[2], 2)
    await eventually(lambda: service.current_version() == 2)

    # a truncated file (its pointer's hash matches the broken bytes): onnxruntime refuses it
    n = service.stats.predictions
    publish_model(models, blobs[3][: len(blobs[3]) // 3], 3)
    await eventually(lambda: service.stats.refused["load"] == 1)
    # a pointer whose hash does not match the file: refused, reported once, not loaded
    name = "v4-broken.onnx"
    atomic_write(models / name, blobs[4][:100])
    atomic_write(models / POINTER, json.dumps({"version": 4, "hash": content_hash(blobs[4]), "file": name}).encode())
    await eventually(lambda: service.stats.refused["hash"] == 1)
    await asyncio.sleep(0.2)  # several more polls
    assert service.stats.refused["hash"] == 1
    assert service.current_version() == 2
    await eventually(lambda: service.stats.predictions > n + 100)  # the line kept scoring

    # a correct version 4 later replaces the broken pointer
    publish_model(models, blobs[4], 4)
    await eventually(lambda: service.current_version() == 4)

    # the edge agent re-exports version 4 with a retrained personal head: same version, new bytes
    head = linear_onnx(weights[4], TRUE_B + 0.25)
    publish_model(models, head, 4, local_round=9)
    await eventually(lambda: service.current is not None and service.current.info.hash == content_hash(head))
    # an older version appearing in the model dir is not taken
    publish_model(models, blobs[2], 3)
    await asyncio.sleep(0.2)
    assert service.current.info.hash == content_hash(head)

    # rollback through the request file `fedline infer --rollback` writes
    StateDir(tmp_path / "state").request_rollback()
    await eventually(lambda: service.current is not None and service.current.info.hash == content_hash(blobs[4]))
    assert not StateDir(tmp_path / "state").rollback_requested()
    publish_model(models, head, 4)  # the rolled-back model is named again: it must not come back
    await asyncio.sleep(0.2)
    assert service.current.info.hash == content_hash(blobs[4])
    publish_model(models, linear_onnx(TRUE_W * 1.5, TRUE_B), 5)
    await eventually(lambda: service.current is not None and service.current.version == 5)

    stream.stop()
    await asyncio.wait_for(task, bound(10))
    preds = read_predictions(tmp_path / "predictions.jsonl")
    assert [p["seq"] for p in preds] == list(range(len(stream.xs)))
    assert [s.kind for s in service.stats.swaps] == ["reload", "reload", "reload", "reload", "rollback", "reload"]
    assert [s.version for s in service.stats.swaps] == [1, 2, 4, 4, 4, 5]
    ws = {content_hash(b)[:12]: (w, TRUE_B) for (v, w), b in zip(weights.items(), blobs.values())}
    ws[content_hash(head)[:12]] = (weights[4], TRUE_B + 0.25)
    ws[content_hash(linear_onnx(TRUE_W * 1.5, TRUE_B))[:12]] = (TRUE_W * 1.5, TRUE_B)
    assert len({p["model"] for p in preds}) == 5
    for p in preds:
        w, b = ws[p["model"]]
        assert abs(p["score"] - linear_score(w, b, stream.xs[p["seq"]])) < 1e-5
        assert p["label"] in (0.0, 1.0)
    serving = json.loads((tmp_path / "state" / "serving.json").read_text())
    assert serving["current"]["version"] == 5 and serving["previous"]["version"] == 4
    assert serving["blocked"] == [[4, content_hash(head)]]

    # after a restart the rolled-back model stays refused even though the pointer names it again
    publish_model(models, head, 6)  # new version number, same bytes: still the model rolled back from
    service = InferenceService(cfg, rows=RowStream(seed=4, limit=200, per_tick=5, tick_s=0.01))
    await asyncio.wait_for(service.run(), bound(10))  # 0.4 s: several polls of the model dir
    assert service.current is not None and service.current.version == 5
    assert [s.kind for s in service.stats.swaps] == ["restore"]


async def test_restart_serves_the_saved_model_at_once_and_cli_rollback(tmp_path: Path) -> None:
    models = tmp_path / "models"
    publish_model(models, linear_onnx(TRUE_W, TRUE_B), 1)
    cfg = make_config(tmp_path)
    stream = RowStream(seed=1)
    service = InferenceService(cfg, rows=stream)
    task = await start(service)
    await eventually(lambda: service.current_version() == 1)
    publish_model(models, linear_onnx(TRUE_W * 1.2, TRUE_B), 2)
    await eventually(lambda: service.current_version() == 2)
    await eventually(
        lambda: (
            (tmp_path / "state" / "serving.json").exists()
            and json.loads((tmp_path / "state" / "serving.json").read_text())["current"]["version"] == 2
        )
    )
    stream.stop()
    await task

    # the model dir is wiped (new disk image, say): the saved model serves the first row
    for f in models.iterdir():
        f.unlink()
    service = InferenceService(cfg, rows=RowStream(seed=2, limit=40))
    await asyncio.wait_for(service.run(), bound(10))
    assert service.stats.swaps[0].kind == "restore" and service.stats.swaps[0].first_seq == 0
    assert service.stats.predictions == 40
    assert {p["version"] for p in read_predictions(tmp_path / "predictions.jsonl")[-40:]} == {2}

    # `fedline infer --rollback` with no service running changes the saved state
    from fedline.cli import main

    cfg_file = tmp_path / "line.toml"
    cfg_file.write_text(
        '[line]\nsite = "site-a"\nfederation = "test"\nstate_dir = "state"\nmodel_source = "model_dir"\n'
        'model_dir = "models"\npoll_s = 0.05\n[rows]\nfeatures = [{ tag = "t0", range = [0, 1] }, '
        '{ tag = "t1", range = [0, 1] }, { tag = "t2", range = [0, 1] }, { tag = "t3", range = [0, 1] }]\n'
    )
    assert main(["infer", "--config", str(cfg_file), "--rollback", "--wait", "0.2"]) == 0
    serving = json.loads((tmp_path / "state" / "serving.json").read_text())
    assert serving["current"]["version"] == 1 and serving["previous"] is None and serving["blocked_version"] == 2
    assert main(["infer", "--config", str(cfg_file), "--rollback", "--wait", "0.2"]) == 1  # nothing left
    service = InferenceService(cfg, rows=RowStream(seed=2, limit=10))
    await asyncio.wait_for(service.run(), bound(10))
    assert service.current is not None and service.current.version == 1
    assert np.isfinite([p["score"] for p in read_predictions(tmp_path / "predictions.jsonl")[-10:]]).all()


async def test_stop_without_a_model_and_a_full_queue_returns(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, {"queue_max": 32, "batch_max": 8})
    service = InferenceService(cfg, rows=RowStream(seed=0))
    task = asyncio.create_task(service.run())
    await eventually(lambda: service.stats.rows >= 32)  # queue full, nothing to score with
    assert service.stats.predictions == 0
    service.stop()
    await asyncio.wait_for(task, 5)


async def test_a_failing_source_ends_the_service_with_its_error(tmp_path: Path) -> None:
    publish_model(tmp_path / "models", linear_onnx(TRUE_W, TRUE_B), 1)

    async def rows():
        async for row in RowStream(seed=0, limit=20):
            yield row
        raise OSError("line.csv vanished")

    service = InferenceService(make_config(tmp_path), rows=rows())
    try:
        await asyncio.wait_for(service.run(), bound(10))
    except OSError as exc:
        assert "vanished" in str(exc)
    else:
        raise AssertionError("the source's error was swallowed")
    assert service.stats.predictions == 20  # what came before the failure was scored


async def test_cli_rollback_reaches_the_running_service(tmp_path: Path) -> None:
    from edge.inference.config import load_infer_config
    from fedline.cli import main

    cfg_file = tmp_path / "line.toml"
    cfg_file.write_text(
        '[line]\nsite = "site-a"\nfederation = "test"\nstate_dir = "state"\nmodel_source = "model_dir"\n'
        'model_dir = "models"\npoll_s = 0.05\n[rows]\nfeatures = [{ tag = "t0", range = [0, 1] }, '
        '{ tag = "t1", range = [0, 1] }, { tag = "t2", range = [0, 1] }, { tag = "t3", range = [0, 1] }]\n'
    )
    models = tmp_path / "models"
    publish_model(models, linear_onnx(TRUE_W, TRUE_B), 1)
    stream = RowStream(seed=6)
    service = InferenceService(load_infer_config(cfg_file), rows=stream)
    task = asyncio.create_task(service.run())
    await eventually(lambda: service.current_version() == 1)
    publish_model(models, linear_onnx(TRUE_W * 1.1, TRUE_B), 2)
    await eventually(lambda: service.current_version() == 2)
    await eventually(lambda: json.loads((tmp_path / "state" / "serving.json").read_text())["current"]["version"] == 2)
    rc = await asyncio.to_thread(main, ["infer", "--config", str(cfg_file), "--rollback", "--wait", "5"])
    assert rc == 0
    assert service.current is not None and service.current.version == 1
    assert service.stats.swaps[-1].kind == "rollback"
    stream.stop()
    await asyncio.wait_for(task, bound(10))


async def test_a_malformed_row_is_emitted_unscored_and_the_rest_of_its_batch_is_scored(tmp_path: Path) -> None:
    from firmware_adapters.rows import Row

    publish_model(tmp_path / "models", linear_onnx(TRUE_W, TRUE_B), 1)
    xs = [np.full(4, i / 100, np.float32) for i in range(100)]
    xs[50] = np.zeros(3, np.float32)  # a row of the wrong width

    async def rows():
        for x in xs:
            yield Row(x=x, y=None, ts=0.0)

    service = InferenceService(make_config(tmp_path, {"batch_max": 32}), rows=rows())
    await asyncio.wait_for(service.run(), bound(10))
    preds = read_predictions(tmp_path / "predictions.jsonl")
    assert [p["seq"] for p in preds] == list(range(100))
    assert preds[50]["score"] is None and service.stats.score_errors == 1
    for i, p in enumerate(preds):
        if i != 50:
            assert abs(p["score"] - linear_score(TRUE_W, TRUE_B, xs[i])) < 1e-5


async def test_the_line_reports_which_model_its_site_picked(tmp_path: Path) -> None:
    """The served kind and validation metric the edge writes into current.json become the line's status."""
    models = tmp_path / "models"
    publish_model(models, linear_onnx(TRUE_W, TRUE_B), 1)  # no pick: nothing to report
    cfg = make_config(tmp_path, {"canary": {"min_rows": 16, "margin": 0.05}})
    service = InferenceService(cfg, rows=RowStream(seed=4))
    task = await start(service)
    try:
        await eventually(lambda: service.current_version() == 1)
        assert service.stats.served is None
        served = {"kind": "fine_tuned", "metric": "roc_auc", "validation_metric": 0.9312, "reason": "too small"}
        publish_model(models, linear_onnx(TRUE_W * 1.1, TRUE_B), 2, served=served)
        await eventually(lambda: service.current_version() == 2)
        assert service.stats.served == {**served, "weight": None, "blend_of": None}
        text = service.metrics.registry.get_sample_value(
            "fedline_infer_served_validation_metric", {"kind": "fine_tuned", "metric": "roc_auc"}
        )
        assert text == 0.9312
        # a blend of local-only and the global model (edge/blend.py): the status names its weight and partner
        mixed = {**served, "kind": "blend", "validation_metric": 0.95, "weight": 0.25, "blend_of": "global"}
        publish_model(models, linear_onnx(TRUE_W * 1.05, TRUE_B), 3, served=mixed)
        await eventually(lambda: service.current_version() == 3)
        assert service.stats.served == mixed
    finally:
        service.stop()
        await asyncio.wait_for(task, bound(30))


async def test_an_older_serving_state_saved_late_does_not_overwrite_a_newer_one(tmp_path: Path) -> None:
    """Regression: a rollback's save still running in its thread when the next version's swap saved. The older
    state landed last, so serving.json named version 4 while version 5 served, and its clean-up deleted version
    5's file (a restart would have served 4). Saves now keep the order of the states they were asked for."""
    from edge.inference.session import ModelInfo, build_model

    service = InferenceService(make_config(tmp_path), rows=RowStream(seed=5))
    loader = service.loader
    models = {}
    for v in (4, 5):
        blob = linear_onnx(TRUE_W * (1 + 0.1 * v), TRUE_B)
        models[v] = build_model(blob, ModelInfo(v, content_hash(blob), "model_dir"), service.row_shape)
    real_save = loader.state.save

    def slow_for_four(serving) -> None:  # type: ignore[no-untyped-def]
        if serving.current is not None and serving.current.version == 4:
            import time

            time.sleep(0.4)  # the older state's save is the slow one
        real_save(serving)

    loader.state.save = slow_for_four  # type: ignore[method-assign]
    loader.current = models[4]
    first = asyncio.create_task(loader.persist())
    await asyncio.sleep(0.1)  # its thread is in the slow save
    loader.current, loader.previous = models[5], models[4]
    await loader.persist()
    await first
    serving = StateDir(tmp_path / "state").load()
    assert serving.current is not None and serving.current.version == 5
    assert serving.previous is not None and serving.previous.version == 4
    assert StateDir(tmp_path / "state").read_model(serving.current) == models[5].blob
