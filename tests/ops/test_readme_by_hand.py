"""The README's "Setting up a federation by hand", run exactly as written: its shell block is
taken from README.md and run with bash in a folder holding this checkout's ``data/``, with
``BROKER_PORT`` set to a free port (the block's only variable). Real Mosquitto over TLS, real
``fedline`` processes. Then, as an operator would, ``fedline status --json`` until the
federation has made a version from the three plants' updates and the line serves it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker_bridge.mosquitto import free_port
from fedline.launch import REPO

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(400)]


def readme_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Setting up a federation by hand", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```sh\n(.*?)```", section, re.S)
    return block


def status(fed: Path, env: dict[str, str]) -> dict:
    r = subprocess.run(
        ["fedline", "status", "--config", "observer.toml", "--json", "--listen", "1"],
        cwd=fed,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_readme_by_hand_runs_as_written(tmp_path: Path) -> None:
    (tmp_path / "data").symlink_to(REPO / "data")
    bin_dir = Path(sys.executable).parent
    env = dict(
        os.environ,
        BROKER_PORT=str(free_port()),
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
    )
    script = tmp_path / "by-hand.sh"
    script.write_text("set -e\n" + readme_block())
    log = (tmp_path / "by-hand.log").open("w")
    proc = subprocess.Popen(
        ["bash", str(script)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    fed = tmp_path / "fed"
    try:
        assert proc.wait(120) == 0, (tmp_path / "by-hand.log").read_text()[-3000:]
        conf = (fed / "broker" / "mosquitto.conf").read_text()
        assert conf.count("listener ") == 1 and "certfile" in conf  # TLS only
        deadline = time.monotonic() + 240
        doc: dict = {}
        while time.monotonic() < deadline:
            doc = status(fed, env)
            line = doc["services"].get("plant-a.line", {})
            if (doc["model"] or {}).get("version", 0) >= 1 and line.get("version", 0) >= 1:
                break
            time.sleep(3)
        assert doc["model"]["epoch"] >= 1 and doc["model"]["version"] >= 1, json.dumps(doc, indent=1)
        assert doc["services"]["aggregator"]["state"] == "online"
        assert doc["services"]["plant-a.line"]["state"] == "online"
        assert sorted(doc["sites"]) == ["plant-a", "plant-b", "plant-c"]
        assert all(s["state"] == "online" for s in doc["sites"].values())
        preds = [json.loads(x) for x in (fed / "predictions.jsonl").read_text().splitlines()]
        assert preds and any(p["version"] >= 1 for p in preds)
        assert "Traceback" not in (tmp_path / "by-hand.log").read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the block's background processes share its session
        time.sleep(2)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
