"""The deployment files are what the real CLI and config loaders accept.

Docker does not run here, so: docker-compose.yml is parsed, every fedline command in it is
parsed by the real ``fedline`` argument parser, every config file it mounts is loaded by the
part's own loader, and ``deploy/compose/init.sh`` is run for real (with the real ``fedline``
command) to produce the secrets every config points at. The systemd units' command lines go
through the same parser, and the Mosquitto bridge config is run between two real brokers.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedline.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
MOUNTS = {"/etc/fedline": ROOT / "deploy" / "compose", "/app": ROOT}
SECRETS = "/var/lib/fedline/secrets"
LOADERS = {
    "aggregator": ("aggregator.config", "load_config"),
    "edge": ("edge.config", "load_edge_config"),
    "infer": ("edge.inference.config", "load_infer_config"),
    "status": ("aggregator.status", "load_status_config"),
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def secrets(tmp_path_factory) -> Path:
    """Run init.sh with the real fedline command into a temp dir (what the init container does)."""
    out = tmp_path_factory.mktemp("secrets")
    env = dict(os.environ, SECRETS=str(out), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(
        ["sh", str(ROOT / "deploy" / "compose" / "init.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    again = subprocess.run(
        ["sh", str(ROOT / "deploy" / "compose" / "init.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, "init.sh must be re-runnable: " + again.stderr
    return out


def host_path(p: str, secrets: Path | None = None) -> Path:
    if secrets is not None and p.startswith(SECRETS):
        return secrets / p[len(SECRETS) + 1 :]
    for prefix, local in MOUNTS.items():
        if p.startswith(prefix + "/"):
            return local / p[len(prefix) + 1 :]
    raise AssertionError(f"{p} is not under a mounted folder")


def secret_file(compose: dict, name: str, secrets: Path) -> Path:
    """Where init.sh wrote the compose secret ``name`` (its ``file:`` is under ./secrets/)."""
    src = compose["secrets"][name]["file"]
    assert src.startswith("./secrets/"), src
    return secrets / src.removeprefix("./secrets/")


def fedline_services(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if s.get("image", "").startswith("fedline") and "command" in s}


def test_compose_has_broker_aggregator_and_three_full_sites(compose):
    names = set(compose["services"])
    assert {"mosquitto", "aggregator", "init"} <= names
    for site in "LMH":
        assert {f"plc-{site}", f"edge-{site}", f"infer-{site}"} <= names


def test_every_long_running_service_has_a_health_check_and_a_restart_policy(compose):
    for name, svc in compose["services"].items():
        if name in ("init", "status"):
            assert svc.get("restart") == "no"
            continue
        assert svc.get("restart") == "unless-stopped", name
        assert svc.get("healthcheck", {}).get("test"), name


def test_every_fedline_command_parses_with_the_real_cli(compose):
    parser = build_parser()
    seen = set()
    for name, svc in fedline_services(compose).items():
        args = parser.parse_args(svc["command"])
        assert callable(args.func), name
        seen.add(args.command)
    assert seen == {"aggregator", "edge", "infer", "plc-sim", "status"}


def test_every_mounted_config_loads_and_its_files_exist(compose, secrets):
    import importlib

    parser = build_parser()
    checked = 0
    for name, svc in fedline_services(compose).items():
        args = parser.parse_args(svc["command"])
        if args.command == "plc-sim":
            assert host_path(args.csv).is_file() and host_path(args.map).is_file()
            from firmware_adapters.registers import load_register_map

            load_register_map(host_path(args.map))
            continue
        module, fn = LOADERS[args.command]
        cfg_path = host_path(args.config)
        getattr(importlib.import_module(module), fn)(cfg_path)  # raises ConfigError naming file and key
        checked += 1
        # every absolute path the config names exists: in the image (/app), the mounts, or the secrets init made
        text = cfg_path.read_text()
        for token in shlex.split(text.replace("=", " "), comments=True):
            if token.startswith("/run/secrets/"):  # a compose secret: this service must declare it
                name = token.removeprefix("/run/secrets/")
                assert name in svc.get("secrets", []), f"{name}: {token} is not one of its secrets"
                assert secret_file(compose, name, secrets).exists(), f"{cfg_path.name}: {token} does not exist"
            if token.startswith(("/app/", SECRETS + "/")):
                assert host_path(token, secrets).exists(), f"{cfg_path.name}: {token} does not exist"
            if token.startswith("/var/lib/fedline/") and not token.startswith(SECRETS):
                mount = "/".join(token.split("/")[:5])
                assert any(
                    v.split(":")[1] in (mount, token) or token.startswith(v.split(":")[1] + "/") for v in svc["volumes"]
                ), f"{name}: {token} is on no volume"
    assert checked == 8  # aggregator, status, 3 edges, 3 line inferences


def test_every_edge_outbox_fits_the_aggregators_verdict_window(compose):
    """An edge resends only what its outbox holds; the aggregator answers a resend from its kept verdicts,
    so every site's outbox.max_count must stay below [aggregator] keep_verdicts (else a lost receipt could
    turn an applied update's resend into a 'replay' refusal)."""
    from aggregator.config import load_config
    from edge.config import load_edge_config

    parser = build_parser()
    commands = [parser.parse_args(svc["command"]) for svc in fedline_services(compose).values()]
    (agg,) = [load_config(host_path(a.config)) for a in commands if a.command == "aggregator"]
    edges = [load_edge_config(host_path(a.config)) for a in commands if a.command == "edge"]
    assert len(edges) == 3
    assert all(e.outbox.max_count < agg.aggregator.keep_verdicts for e in edges)


def test_service_hosts_and_volumes_are_declared(compose):
    services = set(compose["services"])
    declared = set(compose["volumes"])
    for name, svc in compose["services"].items():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if not src.startswith("."):
                assert src in declared, f"{name}: volume {src} not declared"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
    for site in "LMH":
        text = (ROOT / "deploy" / "compose" / "sites" / site / "site.toml").read_text()
        assert f'host = "plc-{site}"' in text and 'url = "mqtts://mosquitto:8883"' in text
        assert 'ca_file = "/run/secrets/broker-ca"' in text


def test_init_writes_broker_config_with_acl_for_every_site(secrets):
    conf = (secrets / "broker" / "mosquitto.conf").read_text()
    assert "listener 8883 0.0.0.0" in conf and "allow_anonymous false" in conf
    assert f"certfile {secrets}/broker/pki/server.crt" in conf and "use_username_as_clientid true" in conf
    assert conf.count("listener ") == 1  # TLS only: no plaintext listener in a deployment
    assert "persistence_location /mosquitto/data/" in conf  # the Mosquitto image's own, mosquitto-owned folder
    assert f"password_file {secrets}/broker/passwd" in conf
    acl = (secrets / "broker" / "acl").read_text()
    assert "pattern write fedline/plant/sites/%u/update/#" in acl
    users = {line.split(":")[0] for line in (secrets / "broker" / "passwd").read_text().split()}
    assert users == {"aggregator", "observer", "L", "M", "H", "L.line", "M.line", "H.line"}
    assert not (secrets / "broker" / "credentials").exists()  # the broker's folder holds no plaintext password
    assert (secrets / "keys" / "L.key").stat().st_mode & 0o077 == 0


def test_dockerfile_installs_the_package_and_runs_fedline():
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["fedline"]' in text and "USER fedline" in text
    for part in ("fedline", "broker_bridge", "firmware_adapters", "models", "edge", "aggregator", "data"):
        assert f"COPY {part} ./{part}" in text
    pinned = next(line for line in (ROOT / "pyproject.toml").read_text().splitlines() if '"torch==' in line)
    assert pinned.split('"')[1] in text  # the image's torch is the pinned one


async def test_plant_bridge_forwards_updates_and_models(tmp_path):
    """deploy/mosquitto/plant-bridge.conf between a plant broker and the central broker (both real)."""
    import asyncio

    from broker_bridge.client import BrokerSettings, MqttClient
    from broker_bridge.mosquitto import MosquittoProcess

    central = MosquittoProcess(tmp_path / "central", federation="plant-a", sites=["press-3"]).start()
    plant = MosquittoProcess(tmp_path / "plant", federation="plant-a", sites=["press-3"])
    bridge = (ROOT / "deploy" / "mosquitto" / "plant-bridge.conf").read_text()
    bridge = bridge.replace("central.example.com:8883", f"127.0.0.1:{central.tls_port}")  # over TLS
    bridge = bridge.replace("CHANGE-ME-from-credentials/press-3.password", central.password("press-3"))
    bridge = bridge.replace("/etc/mosquitto/certs/central-ca.crt", central.ca_file)
    with plant.paths["conf"].open("a") as fh:
        fh.write("\n" + bridge + "\n")
    plant.start()
    try:

        def settings(broker, user, cid):
            return BrokerSettings(
                url=broker.url,
                username=user,
                password=broker.password(user),
                client_id=cid,
                backoff_min_s=0.05,
                backoff_max_s=0.5,
                timeout_s=10,
            )

        root = "fedline/plant-a"
        async with (
            MqttClient(settings(central, "aggregator", "agg")) as agg,
            MqttClient(settings(plant, "press-3", "site")) as site,
        ):
            await agg.subscribe(f"{root}/sites/+/update/#")
            await site.subscribe(f"{root}/sites/press-3/receipts")
            await site.subscribe(f"{root}/model/#")
            await agg.wait_connected(10)
            await site.wait_connected(10)

            async def first(client, timeout=15.0):
                return await asyncio.wait_for(client.messages().__anext__(), timeout)

            # the bridge connects in the background: publish until the chunk comes through
            msg = None
            for _ in range(30):
                await site.publish(f"{root}/sites/press-3/update/u1/0", b"sealed-bytes")
                try:
                    msg = await asyncio.wait_for(agg.messages().__anext__(), 1.0)
                    break
                except TimeoutError:
                    continue
            assert (
                msg is not None and msg.topic == f"{root}/sites/press-3/update/u1/0" and msg.payload == b"sealed-bytes"
            )
            await agg.publish(f"{root}/sites/press-3/receipts", b"receipt")
            got = await first(site)
            assert (got.topic, got.payload) == (f"{root}/sites/press-3/receipts", b"receipt")
            await agg.publish(f"{root}/model/manifest", b"manifest", retain=True)
            got = await first(site)
            assert (got.topic, got.payload) == (f"{root}/model/manifest", b"manifest")
    finally:
        plant.stop()
        central.stop()
