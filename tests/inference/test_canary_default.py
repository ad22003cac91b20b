"""The line's canary is on by default wherever its rows carry a label (no [line.canary] table needed).

Real onnxruntime and a model directory on disk, as the edge agent writes it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edge.inference.config import load_infer_config
from edge.inference.model_dir import publish_model
from edge.inference.service import InferenceService
from fedline.testing.patience import bound
from tests.conftest import eventually
from tests.inference.conftest import FEATURES, TRUE_B, TRUE_W, RowStream, make_config
from tests.inference.onnx_models import linear_onnx

ROOT = Path(__file__).resolve().parents[2]


async def _offer_worse_model(tmp_path: Path, labelled_rows: bool, **top) -> InferenceService:
    """Serve a good version 1 for a while, then offer version 2, which predicts the opposite."""
    models = tmp_path / "models"
    publish_model(models, linear_onnx(TRUE_W * 3, TRUE_B * 3), 1)
    cfg = make_config(tmp_path, **top)  # no [line.canary] table: the defaults
    service = InferenceService(cfg, rows=RowStream(seed=4, labelled=labelled_rows))
    task = asyncio.create_task(service.run())
    await eventually(lambda: service.current_version() == 1 and service.stats.predictions > 300)
    publish_model(models, linear_onnx(-TRUE_W * 3, -TRUE_B * 3), 2)
    await eventually(lambda: service.stats.refused["canary"] == 1 or service.current_version() == 2)
    service.stop()
    await asyncio.wait_for(task, bound(20))
    return service


async def test_a_worse_model_is_kept_out_by_default_when_rows_are_labelled(tmp_path: Path) -> None:
    service = await _offer_worse_model(tmp_path, labelled_rows=True)
    assert service.canary_on
    assert dict(service.stats.refused) == {"canary": 1} and service.current_version() == 1


async def test_without_a_label_there_is_no_canary_and_the_model_is_taken(tmp_path: Path) -> None:
    rows = {"features": FEATURES}  # no label: nothing to check a new model against
    service = await _offer_worse_model(tmp_path, labelled_rows=False, rows=rows)
    assert not service.canary_on
    assert dict(service.stats.refused) == {} and service.current_version() == 2


@pytest.mark.parametrize(
    "path",
    [
        "edge/inference/line.example.toml",
        "deploy/compose/sites/L/line.toml",
        "deploy/compose/sites/M/line.toml",
        "deploy/compose/sites/H/line.toml",
    ],
)
def test_the_shipped_line_configs_run_the_canary(path: str) -> None:
    assert InferenceService(load_infer_config(ROOT / path)).canary_on


def test_the_demo_line_runs_the_canary(tmp_path: Path) -> None:
    from fedline.demo import workspace
    from fedline.demo.data import load_demo_data

    data = load_demo_data(max_rows_per_site=300, derived=False)
    site = data.sites[0]
    urls = {site.site: "mqtt://127.0.0.1:1"}
    ws = workspace.Workspace(tmp_path / "demo", broker_url=urls[site.site], site_urls=urls, plc_ports={site.site: 1})
    paths = workspace.write_site(ws, data, site, workspace.Tuning(), True)
    assert InferenceService(load_infer_config(paths["line"])).canary_on
