"""A line following the manifest refuses a signed version that moved too far from the one it serves.

The step is measured on the tensors inside the ONNX the line would run (edge.inference.onnx_params)
with the bound the edge uses (models.step_bound). The service test runs the real line service over a
real Mosquitto, the test playing the aggregator (tests/inference/conftest.py).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from broker_bridge.client import MqttClient
from broker_bridge.keys import KeyPair
from broker_bridge.topics import Topics
from edge.inference.onnx_params import check_step, layout_change, onnx_params
from edge.inference.service import InferenceService
from edge.inference.session import ModelRefused
from fedline.testing.patience import bound
from models.step_bound import StepBound
from tests.conftest import eventually, settings_for
from tests.inference.conftest import Aggregator, RowStream, broker_table, make_config
from tests.inference.onnx_models import linear_onnx, mlp_onnx


def _constant_model(w: np.ndarray) -> bytes:
    """y = x @ w with w in a Constant node instead of an initializer."""
    node_w = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w.astype(np.float32), "w"))
    graph = helper.make_graph(
        [node_w, helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_the_tensors_of_an_onnx_model_and_the_step_by_hand() -> None:
    params = onnx_params(linear_onnx(np.array([3.0, 4.0]), 0.0))
    assert sorted(params) == ["graph/b0", "graph/w0"]
    assert params["graph/w0"].ravel().tolist() == [3.0, 4.0] and params["graph/b0"].tolist() == [0.0]
    # Constant nodes count too (a weight moved out of the initializers is still measured)
    assert onnx_params(_constant_model(np.array([[1.0], [2.0]])))["graph/Constant:w.value"].ravel().tolist() == [1, 2]

    cur = linear_onnx(np.array([3.0, 4.0]), 0.0)  # ‖model‖ = 5
    far = linear_onnx(np.array([3.0, 10.0]), 0.0)  # step (0, 6): ‖step‖ = 6
    with pytest.raises(ModelRefused) as exc:
        check_step(StepBound(max_step_relative=1.0), cur, 1, far, 2)  # 6 > 1 × 1 version × 5
    assert exc.value.reason == "step" and "max_step_relative 1" in exc.value.detail
    check_step(StepBound(max_step_relative=1.0), cur, 1, far, 3)  # two versions apart: 6 <= 1 × 2 × 5
    check_step(StepBound(max_step_relative=1.25), cur, 1, far, 2)  # 6 <= 6.25
    with pytest.raises(ModelRefused, match="max_step_l2 5"):
        check_step(StepBound(max_step_relative=0.0, max_step_l2=5.0), cur, 1, far, 2)
    check_step(StepBound(max_step_relative=0.0, max_step_l2=0.0), cur, 1, far, 2)  # off

    # another layout (a renamed, moved or reshaped weight) is no version of the same model: refused
    assert "gone" in (layout_change(onnx_params(cur), onnx_params(_constant_model(np.ones((2, 1))))) or "")
    wider = mlp_onnx([np.ones((2, 3)), np.ones((3, 1))], [np.zeros(3), np.zeros(1)])
    with pytest.raises(ModelRefused, match="changed"):
        check_step(StepBound(), cur, 1, wider, 2)
    with pytest.raises(ModelRefused) as exc:
        onnx_params(b"\x00not onnx at all")
    assert exc.value.reason == "load"
    assert onnx.load_from_string(cur) is not None


async def _status_doc(mosquitto, user: str) -> dict:
    """The line's retained liveness document, as the aggregator or an operator reads it."""
    async with MqttClient(settings_for(mosquitto, "observer")) as client:
        await client.subscribe(Topics("test").service_status(user), 1)
        async with asyncio.timeout(bound(10)):
            async for msg in client.messages():
                if msg.payload:
                    return json.loads(msg.payload)
    raise AssertionError(f"no retained status for {user}")


async def test_the_line_refuses_a_signed_version_that_jumped_and_says_so(
    tmp_path: Path, mosquitto, aggregator_keys: KeyPair, site_keys: KeyPair
) -> None:
    w1 = np.array([3.0, -2.0, 1.5, -1.0])  # ‖(w, b)‖ = √16.5 ≈ 4.06
    v1 = linear_onnx(w1, -0.5)
    jump = linear_onnx(w1 + 61.5, -0.5)  # every weight + 61.5: ‖step‖ = 123 > 10 × 4.06 (default bound)
    cfg = make_config(  # the line logs in as its own broker user, site-a.line
        tmp_path,
        {"model_source": "manifest", "aggregator_key": "aggregator.pub", "site_key": "site-a.key", "batch_max": 16},
        broker=broker_table(settings_for(mosquitto, "site-a.line")),
    )

    async def start() -> tuple[InferenceService, RowStream, asyncio.Task]:
        stream = RowStream(seed=3, labelled=False)
        service = InferenceService(cfg, rows=stream)
        return service, stream, asyncio.create_task(service.run())

    service, stream, task = await start()
    async with MqttClient(settings_for(mosquitto, "aggregator")) as agg_client:
        agg = Aggregator(agg_client, aggregator_keys, site_keys)
        await agg.publish(1, v1)
        await eventually(lambda: service.current_version() == 1)
        await agg.publish(2, jump)  # signed by the aggregator's key, yet 30 × the model's norm away
        await eventually(lambda: service.stats.refused["step"] == 1)
        n = service.stats.predictions
        await eventually(lambda: service.stats.predictions > n + 50)  # version 1 scores on
        assert service.current is not None and service.current.version == 1
        assert service.model_refused == {"version": 2, "reason": "step"}
        value = service.metrics.registry.get_sample_value
        assert value("fedline_infer_refused_total", {"reason": "step"}) == 1.0
        await eventually(lambda: service._liveness is not None and service._liveness.model_refused is not None)
        doc = await _status_doc(mosquitto, "site-a.line")
        assert doc["model_refused"] == {"version": 2, "reason": "step"} and doc["version"] == 1, doc

        # a restart serves version 1 from its state dir and refuses the retained version 2 again
        stream.stop()
        await asyncio.wait_for(task, bound(20))
        service, stream, task = await start()
        await eventually(lambda: service.stats.refused["step"] == 1)
        assert service.current is not None and service.current.version == 1

        # an honest later version, within two versions' reach of version 1, is taken
        await agg.publish(3, linear_onnx(w1 * 1.1, -0.5))
        await eventually(lambda: service.current_version() == 3)
    stream.stop()
    await asyncio.wait_for(task, bound(20))
    assert dict(service.stats.refused) == {"step": 1}
    assert [(s.version, s.kind) for s in service.stats.swaps] == [(1, "restore"), (3, "reload")]
