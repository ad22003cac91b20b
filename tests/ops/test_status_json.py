"""``fedline status --json`` against a real federation: Mosquitto (TLS), ``fedline aggregator`` and
three ``fedline edge`` processes; the document is parsed and checked field by field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedline.launch import REPO
from fedline.testing.rig import FaultRig, RigSettings

pytestmark = [pytest.mark.broker, pytest.mark.timeout(240)]


def _status(rig: FaultRig, *extra: str) -> subprocess.CompletedProcess[str]:
    cfg = rig.root / "observer.toml"
    cfg.write_text(
        f'federation = "{rig.s.federation}"\nenrollment_file = "{rig.root / "keys" / "enrollment.json"}"\n'
        f'[broker]\nurl = "{rig.broker.tls_url}"\nca_file = "{rig.broker.ca_file}"\nusername = "observer"\n'
        f'password_file = "{rig.broker.paths["password:observer"]}"\n'
    )
    return subprocess.run(
        [sys.executable, "-m", "fedline.cli", "status", "--config", str(cfg), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


async def test_status_json_of_a_running_federation(tmp_path) -> None:
    sites = ["a", "b", "c"]
    async with FaultRig(tmp_path, sites, RigSettings(federation="st", rows_per_site=160, site_keepalive_s=30)) as rig:
        rig.start_all()
        await rig.until(lambda: rig.version() >= 1, 150, "a first aggregated version")
        rig.check_alive()
        proc = _status(rig, "--json", "--listen", "2")
        assert proc.returncode == 0, proc.stderr
        assert len(proc.stdout.strip().splitlines()) == 1  # one document, one line
        doc = json.loads(proc.stdout)
        assert doc["schema"] == 2 and doc["federation"] == "st" and doc["listen_s"] == 2.0
        # the observer is an outsider to the models (issue 13): a sealed manifest shows its version and epoch
        assert doc["model"]["epoch"] == 1 and doc["model"]["version"] >= 1
        assert set(doc["sites"]) == set(sites)
        for name in sites:
            s = doc["sites"][name]
            assert s["state"] == "online" and s["status"]["state"] == "online"
            assert set(s) == {"state", "status", "receipts"}
        assert doc["online_sites"] == 3
        agg = doc["services"]["aggregator"]
        assert agg["service"] == "aggregator" and agg["state"] == "online" and agg["version"] >= 1
        assert doc["bad_messages"] == 0
        assert isinstance(doc["receipts"], dict) and isinstance(doc["collected_at"], float)

        rig.procs["aggregator"].kill9()  # its will: the broker says it is gone
        proc = _status(rig, "--json", "--listen", "1")
        assert json.loads(proc.stdout)["services"]["aggregator"]["state"] == "offline"


def test_status_exit_codes(tmp_path) -> None:
    missing = subprocess.run(
        [sys.executable, "-m", "fedline.cli", "status", "--config", str(tmp_path / "no.toml"), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert missing.returncode == 78 and "no.toml" in missing.stderr  # EX_CONFIG
    usage = subprocess.run(
        [sys.executable, "-m", "fedline.cli", "status", "--json"], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert usage.returncode == 2 and "--config" in usage.stderr
