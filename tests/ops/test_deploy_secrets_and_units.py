"""Deployment checks Docker and systemd cannot run here, done for real where possible:

- compose ``secrets:``: each container mounts only its own key and password; init.sh
  (run for real as the init container would) writes them 0600, owned by the reader;
- the Dockerfile's directory step, run in a throwaway root: every state volume's mount
  point exists, owned by the image's fedline user;
- the systemd units: ``systemd-analyze verify`` says nothing, the serial ports are
  reachable (DeviceAllow, dialout, no PrivateDevices), a bad configuration stops the
  unit (exit 78 not restarted, a start limit), and their command lines run through the
  real CLI: ``--check`` passes on a good site, a bad file exits 78 naming the key.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.demo.test_deploy import ROOT, fedline_services, secret_file

SYSTEMD = ROOT / "deploy" / "systemd"
UNITS = ["fedline-edge@.service", "fedline-infer@.service"]
FEDLINE_UID = 10001


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def secrets(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("secrets")
    env = dict(os.environ, SECRETS=str(out), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(
        ["sh", str(ROOT / "deploy" / "compose" / "init.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_each_service_mounts_only_its_own_key_and_password(compose) -> None:
    declared = compose["secrets"]
    private = {n for n in declared if n.endswith(("-key", "-password"))}
    expected = {"aggregator": {"aggregator-key", "aggregator-password"}, "status": {"observer-password"}}
    for site in "LMH":
        expected[f"edge-{site}"] = {f"{site}-key", f"{site}-password"}
        # a line in manifest mode opens the content key granted to its site with the site's key (issue 13)
        expected[f"infer-{site}"] = {f"{site}-line-password", f"{site}-key"}
    for name, svc in fedline_services(compose).items():
        mine = set(svc.get("secrets", [])) & private
        assert mine == expected.get(name, set()), f"{name} mounts {sorted(mine)}"
        for vol in svc.get("volumes", []):  # and no folder that holds anybody's secrets
            assert not vol.startswith(("./secrets", "secrets:")), f"{name} mounts {vol}"
    broker_vols = compose["services"]["mosquitto"]["volumes"]
    assert "./secrets/broker:/var/lib/fedline/secrets/broker:ro" in broker_vols
    assert not any(v.startswith(("./secrets/keys", "./secrets/credentials", "./secrets:")) for v in broker_vols)


def test_init_writes_private_files_0600_owned_by_their_reader(compose, secrets) -> None:
    for name in compose["secrets"]:
        path = secret_file(compose, name, secrets)
        st = path.stat()
        if name.endswith(("-key", "-password")):
            assert st.st_mode & 0o777 == 0o600, f"{path} is {oct(st.st_mode & 0o777)}"
            if os.geteuid() == 0:  # init runs as root in its container and hands each file to its reader
                assert st.st_uid == FEDLINE_UID, f"{path} is owned by {st.st_uid}"
        else:  # enrollment and CA certificate: public
            assert st.st_mode & 0o004, f"{path} should be world-readable"
    for f in ("passwd", "pki/server.key", "pki/ca.key"):
        assert (secrets / "broker" / f).stat().st_mode & 0o077 == 0, f


def test_dockerfile_creates_and_owns_every_state_directory(compose, tmp_path) -> None:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    assert re.search(r"useradd .*--uid 10001 .*fedline", text)
    (step,) = [line.removeprefix("RUN ").strip() for line in text.splitlines() if line.startswith("RUN install -d")]
    argv = shlex.split(step)
    # run the step in a throwaway root: every absolute path moves under tmp_path
    local = [str(tmp_path / a.lstrip("/")) if a.startswith("/") else a for a in argv]
    subprocess.run(local if os.geteuid() == 0 else [a for a in local if a not in ("-o", "-g", "10001")], check=True)
    mounts = {
        v.split(":")[1]
        for svc in fedline_services(compose).values()
        for v in svc.get("volumes", [])
        if not v.startswith(".")
    }
    assert mounts == {"/var/lib/fedline/aggregator", "/var/lib/fedline/edge", "/var/lib/fedline/infer"}
    for m in mounts:
        d = tmp_path / m.lstrip("/")
        assert d.is_dir(), f"the image does not create {m}"
        assert d.stat().st_mode & 0o777 == 0o750
        if os.geteuid() == 0:
            assert d.stat().st_uid == FEDLINE_UID and d.stat().st_gid == FEDLINE_UID
    # and the configs' state paths sit on those volumes
    for p in ("sites/L/site.toml", "sites/L/line.toml", "aggregator.toml"):
        for path in re.findall(r'"(/var/lib/fedline/[^"]+)"', (ROOT / "deploy" / "compose" / p).read_text()):
            assert any(path == m or path.startswith(m + "/") for m in mounts), f"{p}: {path} on no volume"


def _unit(name: str) -> configparser.SectionProxy:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(SYSTEMD / name)
    return cp["Service"], cp["Unit"]  # type: ignore[return-value]


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_unit_reaches_serial_ports_and_stops_on_a_bad_config(unit) -> None:
    svc, head = _unit(unit)
    text = (SYSTEMD / unit).read_text()
    assert "PrivateDevices=true" not in text
    assert svc["DevicePolicy"] == "closed" and svc["SupplementaryGroups"] == "dialout"
    allowed = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("DeviceAllow=")]
    assert allowed == ["char-ttyS rw", "char-ttyUSB rw", "char-ttyACM rw"]
    assert svc["Restart"] == "on-failure" and svc["RestartPreventExitStatus"] == "78"
    assert int(head["StartLimitBurst"]) >= 1 and int(head["StartLimitIntervalSec"]) > 0
    assert svc["User"] == "fedline" and svc["ProtectSystem"] == "strict"


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify_is_silent(unit, tmp_path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd (make sysdeps installs it)")
    fedline = Path(sys.executable).parent / "fedline"
    assert fedline.exists(), "the venv's fedline console script"
    (tmp_path / unit).write_text((SYSTEMD / unit).read_text().replace("/opt/fedline/bin/fedline", str(fedline)))
    r = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / unit.replace("@.", "@press-3."))],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


def _command_lines(unit: str, site_dir: Path) -> dict[str, list[str]]:
    svc, _ = _unit(unit)
    out = {}
    for key in ("ExecStartPre", "ExecStart"):
        if key in svc:
            argv = shlex.split(svc[key].replace("/etc/fedline/%i", str(site_dir)).replace("%i", "press-3"))
            assert argv[0] == "/opt/fedline/bin/fedline"
            out[key] = [sys.executable, "-m", "fedline.cli", *argv[1:]]
    return out


@pytest.mark.timeout(900)  # four CLI start-ups (torch imports): seconds each, minutes on a loaded machine
def test_unit_command_lines_run_through_the_real_cli(tmp_path) -> None:
    from tests.edge.helpers import Federation, write_csv, write_site

    fed = Federation.create(tmp_path / "fed", ["press-3"])
    good = write_site(fed, "press-3", write_csv(tmp_path / "rows.csv", 10), "mqtt://127.0.0.1:1", None)
    assert good.name == "site.toml"
    site_dir = good.parent  # stands for /etc/fedline/%i
    cmds = _command_lines("fedline-edge@.service", site_dir)
    check = subprocess.run(cmds["ExecStartPre"], capture_output=True, text=True, timeout=240, cwd=good.parent)
    assert check.returncode == 0 and "OK" in check.stdout, check.stderr
    # a bad file: the start command exits 78, which the unit does not restart
    (site_dir / "site.toml").write_text(good.read_text().replace("[training]", "[training]\nbatch_sise = 3", 1))
    for key, argv in cmds.items():
        r = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=good.parent)
        assert r.returncode == 78, (key, r.stderr)
        assert "site.toml: training.batch_sise: unknown key" in r.stderr
    (site_dir / "line.toml").write_text('[line]\nsite = "press-3"\nfederation = "x"\nmodel_sorce = "manifest"\n')
    (argv,) = _command_lines("fedline-infer@.service", site_dir).values()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 78 and "line.toml" in r.stderr and "model_sorce" in r.stderr, r.stderr
