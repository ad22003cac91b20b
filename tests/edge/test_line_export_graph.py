"""The line's ONNX of an MLP site, written from its weights (models.onnx_graph): torch's export of the same
model (the global shared layers, the site's own head), without importing torch's exporter (issue 19)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edge.agent import EdgeAgent
from edge.config import load_edge_config
from fedline.testing.patience import bound
from models import build_model, export_onnx, load_personal_state, load_shared_state
from tests.edge.helpers import Federation, write_csv, write_site

ROOT = Path(__file__).resolve().parents[2]
SITE = "site-a"
NOWHERE = "mqtt://127.0.0.1:9"  # nothing listens: the agent never connects


def _served(agent: EdgeAgent) -> bytes:
    pointer = json.loads((agent.store.model_dir / "current.json").read_text())
    return (agent.store.model_dir / pointer["file"]).read_bytes()


async def test_the_line_onnx_is_torchs_export_of_the_sites_model(tmp_path) -> None:
    fed = Federation.create(tmp_path, [SITE])
    path = write_site(fed, SITE, write_csv(tmp_path / "rows.csv", 240), NOWHERE, None)
    agent = EdgeAgent(load_edge_config(path))
    try:
        await asyncio.wait_for(agent.ingest.run(), bound(20))
        assert await agent.train_once() is not None  # the round moved the site's head away from the seed's
        assert await agent.export_onnx() is not None
        ours = _served(agent)
        spec = agent.spec
        model = build_model(spec, seed=agent.cfg.model_seed)
        load_shared_state(model, spec, agent.base.shared)
        load_personal_state(model, spec, dict(agent.state.personal))
        theirs = export_onnx(model, spec)
        a, b = onnx.load_from_string(ours), onnx.load_from_string(theirs)
        assert a.producer_name == "fedline"
        assert a.graph.SerializeToString() == b.graph.SerializeToString()
        x = np.random.default_rng(0).normal(0.5, 1, (32, spec.n_features)).astype(np.float32)
        run = [
            ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for blob in (ours, theirs)
        ]
        np.testing.assert_array_equal(run[0], run[1])
        head = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}["model.head.weight"]
        np.testing.assert_array_equal(head, agent.state.personal["head.weight"])  # the site's head, not the seed's
        assert not np.array_equal(head, build_model(spec, seed=agent.cfg.model_seed).head.weight.detach().numpy())
    finally:
        agent.close()


def test_the_line_export_of_an_mlp_site_imports_no_torch_exporter(tmp_path) -> None:
    code = f"""
import asyncio, json, sys
from pathlib import Path
from edge.agent import EdgeAgent
from edge.config import load_edge_config
from tests.edge.helpers import Federation, write_csv, write_site
tmp = Path({str(tmp_path)!r})
fed = Federation.create(tmp, ["site-a"])
agent = EdgeAgent(load_edge_config(write_site(fed, "site-a", write_csv(tmp / "rows.csv", 60), "mqtt://127.0.0.1:9", None)))
path = asyncio.run(agent.export_onnx())
agent.close()
print(json.dumps({{"written": path is not None, "torch_onnx": "torch.onnx" in sys.modules}}))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=bound(120))
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"written": True, "torch_onnx": False}
