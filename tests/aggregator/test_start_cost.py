"""The aggregator's start with the collector paused (fedline.startup), and what it logs of its cost.

Each check that depends on what a process has imported or frozen runs in a fresh process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from fedline.testing.patience import bound
from tests.aggregator.helpers import make_federation
from tests.aggregator.test_service_broker import broker_table, read_manifest
from tests.conftest import eventually

ROOT = Path(__file__).resolve().parents[2]


def test_start_pause_ends_once_freezes_and_restores_the_collector() -> None:
    code = """
import gc, json
from fedline.startup import StartPause
gc.enable()
before = gc.get_freeze_count()
pause = StartPause()
inside = gc.isenabled()
kept = [[i] for i in range(50_000)]
frozen = pause.end()
on_after = gc.isenabled()
again = pause.end()
gc.unfreeze()
gc.disable()
StartPause().end()
print(json.dumps({"inside": inside, "added": frozen - before, "on_after": on_after, "again": again == frozen,
                  "ended": pause.ended, "off_stays_off": not gc.isenabled()}))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=bound(60))
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["inside"] is False and got["on_after"] is True and got["ended"] is True
    assert got["added"] >= 50_000  # what was made during the pause is frozen
    assert got["again"] is True  # a second end() freezes nothing more and changes nothing
    assert got["off_stays_off"] is True  # a collector that was off before the start stays off


def _start_cost(log: Path) -> dict[str, str]:
    line = next(ln for ln in log.read_text().splitlines() if "aggregator.start_cost" in ln)
    return dict(re.findall(r"(\w+)=(\S+)", line))


async def test_the_aggregator_process_freezes_its_start_and_preloads_the_first_publish(mosquitto, tmp_path) -> None:
    """``fedline aggregator`` pauses the collector from its imports to ``aggregator.started`` and then freezes:
    on a first start (version 0 built from the seed) and on a restart from the checkpoint, whose start imports
    the ``onnx`` of the first ONNX export too (before, the restart's first publish imported it). The model is an
    MLP, whose version 0 and ONNX are made without torch (models.seed_init, models.onnx_graph): neither start
    imports torch (before 1 Dec 2026, 21:30 UTC, both did, and froze over 280,000 objects)."""
    fed = make_federation(tmp_path / "fed", ["site-a", "site-b"])
    conf = fed.write_config(strategy='kind = "fedbuff"\nbuffer_size = 2', broker=broker_table(mosquitto))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    costs = []
    for run in ("first", "restart"):
        log = tmp_path / f"aggregator-{run}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedline.cli", "aggregator", "--config", str(conf)],
                cwd=fed.root,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            await eventually(lambda: "aggregator.started" in log.read_text(), timeout=120)
            await read_manifest(mosquitto, fed, 0, timeout=bound(60))  # it publishes with the collector back on
            text = log.read_text()
            assert text.index("aggregator.start_cost") < text.index("aggregator.started")
            costs.append(_start_cost(log))
            assert proc.poll() is None
        finally:
            proc.terminate()
            proc.wait(bound(20))
        assert proc.returncode == 0
    first, restart = costs
    assert "aggregator.resumed version=0" in (tmp_path / "aggregator-restart.log").read_text()  # read back
    for cost in (first, restart):
        assert float(cost["cpu_s"]) > 0.1
        assert cost["torch"] == "False"
        # fedline's, numpy's, NaCl's and onnx's objects were made during the pause and frozen: tens of thousands
        assert 30_000 < int(cost["frozen_objects"]) < 150_000
    # the restart builds no model before it starts: without the preload its frozen count is far lower
    assert int(restart["frozen_objects"]) > 0.9 * int(first["frozen_objects"])
