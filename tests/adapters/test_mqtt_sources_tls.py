"""Both MQTT source kinds through a real Mosquitto with TLS and password logins, over MQTT 3.1.1 and 5,
configured only by their source tables (CA, password file relative to the site file)."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import socket
import ssl
import subprocess
import time
from pathlib import Path

import aiomqtt
import pytest

from broker_bridge.mosquitto import free_port, mosquitto_binary, password_hash
from fedline.testing.patience import bound
from firmware_adapters import build_source
from firmware_adapters.sparkplug import sparkplug_b_pb2 as pb
from firmware_adapters.sparkplug.codec import build_payload
from tests.bridge.test_broker_tls_will import make_ca_and_server_cert

pytestmark = [pytest.mark.broker, pytest.mark.timeout(90)]


@pytest.fixture
def tls_broker(tmp_path: Path):
    """Mosquitto with only a TLS listener and two password users (reader, device); yields (port, ca)."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.fail("this test needs the mosquitto broker: apt-get install mosquitto")
    ca, cert, key = make_ca_and_server_cert(tmp_path / "pki")
    (tmp_path / "pw").write_text("".join(f"{u}:{password_hash(u + '-secret')}\n" for u in ("reader", "device")))
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"user {getpass.getuser()}\n"  # as root, mosquitto would drop to a user who cannot read tmp_path
        f"per_listener_settings false\nallow_anonymous false\npassword_file {tmp_path / 'pw'}\n"
        f"persistence false\nlistener {port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    ctx = ssl.create_default_context(cafile=str(ca))
    while True:
        try:
            with (
                socket.create_connection(("127.0.0.1", port), 0.2) as raw,
                ctx.wrap_socket(raw, server_hostname="127.0.0.1"),
            ):
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"mosquitto did not start: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.05)
    yield port, ca
    proc.terminate()
    proc.wait(5)


def device(port: int, ca: Path) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        username="device",
        password="device-secret",
        tls_params=aiomqtt.TLSParameters(ca_certs=str(ca)),
    )


def site_file(tmp_path: Path, ca: Path) -> Path:
    """A site folder holding the CA and the reader's password file, named relative to site.toml."""
    d = tmp_path / "site"
    (d / "secrets").mkdir(parents=True)
    (d / "secrets" / "reader.password").write_text("reader-secret\n")
    (d / "ca.crt").write_bytes(ca.read_bytes())
    return d / "site.toml"


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_mqtt_json_and_sparkplug_over_tls_with_a_password_file(tls_broker, tmp_path: Path, protocol: str) -> None:
    port, ca = tls_broker
    site = site_file(tmp_path, ca)
    broker_keys = {
        "url": f"mqtts://127.0.0.1:{port}",
        "ca_file": "ca.crt",
        "username": "reader",
        "password_file": "secrets/reader.password",
        "protocol": protocol,
        "reconnect_initial_s": 0.05,
        "reconnect_max_s": 0.5,
    }
    tele = build_source({"kind": "mqtt_json", "topics": ["plant/+/telemetry"], **broker_keys}, file=site)
    spark = build_source(
        {
            "kind": "sparkplug",
            "name": "sp",
            "host_id": "fedline-tls",
            "group_id": "g",
            "edge_node_id": "n",
            **broker_keys,
        },
        file=site,
    )
    t_iter, s_iter = tele.__aiter__(), spark.__aiter__()
    t_first, s_first = asyncio.create_task(t_iter.__anext__()), asyncio.create_task(s_iter.__anext__())
    try:
        await asyncio.wait_for(asyncio.gather(tele.ready.wait(), spark.ready.wait()), bound(15))
        async with device(port, ca) as dev:
            await dev.subscribe("spBv1.0/STATE/fedline-tls", qos=1)
            state = await asyncio.wait_for(anext(aiter(dev.messages)), bound(10))  # the host's retained STATE birth
            assert json.loads(state.payload)["online"] is True
            await dev.publish("plant/l1/telemetry", b'{"temp": 20.5}', qos=1)
            await dev.publish(
                "spBv1.0/g/NBIRTH/n",
                build_payload([("bdSeq", None, pb.Int64, 0), ("Speed", 1, pb.UInt32, 1500)], seq=0),
                qos=1,
            )
            t, s = await asyncio.wait_for(asyncio.gather(t_first, s_first), bound(10))
        assert t.values == {"temp": 20.5} and s.values == {"Speed": 1500}
        assert tele._settings().protocol == protocol == spark._settings().protocol
    finally:
        await t_iter.aclose()
        await s_iter.aclose()


async def test_a_wrong_password_file_never_connects(tls_broker, tmp_path: Path) -> None:
    port, ca = tls_broker
    site = site_file(tmp_path, ca)
    (site.parent / "secrets" / "reader.password").write_text("not-the-secret\n")
    tele = build_source(
        {
            "kind": "mqtt_json",
            "topics": ["#"],
            "url": f"mqtts://127.0.0.1:{port}",
            "ca_file": "ca.crt",
            "username": "reader",
            "password_file": "secrets/reader.password",
            "reconnect_initial_s": 0.05,
            "reconnect_max_s": 0.2,
        },
        file=site,
    )
    agen = tele.__aiter__()
    task = asyncio.create_task(agen.__anext__())
    try:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(tele.ready.wait()), 2)
        assert not tele.ready.is_set()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await agen.aclose()
