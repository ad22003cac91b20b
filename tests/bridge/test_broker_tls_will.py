"""TLS to a real Mosquitto, the last will for a site's status, and signed receipts
delivered to the site they belong to."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from broker_bridge import envelope
from broker_bridge.client import BrokerSettings, MqttClient, will_message
from broker_bridge.errors import WireError
from broker_bridge.mosquitto import MosquittoProcess, free_port
from broker_bridge.topics import Topics
from fedline.testing.patience import bound
from tests.bridge import helpers as h
from tests.conftest import FEDERATION, SITES, eventually, settings_for

T = Topics("test")
pytestmark = pytest.mark.timeout(60)  # a hung broker test fails in a minute, not at the suite limit


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca_and_server_cert(d: Path, name: str = "ca") -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN=fedline test {name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.crt",
        cwd=d,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        cwd=d,
    )
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        f"{name}.crt",
        "-CAkey",
        f"{name}.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.crt",
        cwd=d,
    )
    return d / f"{name}.crt", d / "server.crt", d / "server.key"


async def test_tls_listener_with_password_login(tmp_path: Path) -> None:
    ca, cert, key = make_ca_and_server_cert(tmp_path / "pki")
    other_ca, _, _ = make_ca_and_server_cert(tmp_path / "other", "other")
    tls_port = free_port()
    broker = MosquittoProcess(
        tmp_path / "broker",
        federation=FEDERATION,
        sites=SITES,
        tls_port=tls_port,
        ca_file=str(ca),
        cert_file=str(cert),
        key_file=str(key),
    )
    broker.start()
    try:
        tls_url = f"mqtts://127.0.0.1:{tls_port}"
        site_s = replace(settings_for(broker, "site-a", client_id="a-tls"), url=tls_url, ca_file=str(ca))
        agg_s = replace(settings_for(broker, "aggregator", client_id="agg-tls"), url=tls_url, ca_file=str(ca))
        async with MqttClient(agg_s) as agg, MqttClient(site_s) as site:
            await agg.wait_connected(10)
            await agg.subscribe(T.updates_filter())
            await site.publish(T.update_chunk("site-a", "tls", 0), b"over tls")
            msg = await asyncio.wait_for(agg.messages().__anext__(), bound(10))
            assert msg.payload == b"over tls"
        # a client that trusts another CA must not connect (no silent downgrade)
        async with MqttClient(replace(site_s, client_id="a-wrong-ca", ca_file=str(other_ca))) as wrong:
            await eventually(lambda: wrong.stats.connect_failures >= 2)
            assert wrong.stats.connects == 0 and "certificate verify failed" in (wrong.last_error or ""), (
                wrong.last_error
            )
    finally:
        broker.stop()


async def test_last_will_marks_a_vanished_site_offline(mosquitto) -> None:
    status = T.status("site-a")

    async def online(c: MqttClient) -> None:
        await c.publish(status, b"online", retain=True)

    async with MqttClient(settings_for(mosquitto, "aggregator", client_id="agg")) as agg:
        await agg.wait_connected(10)
        await agg.subscribe(T.status_filter())
        seen: list[bytes] = []

        async def collect() -> None:
            async for m in agg.messages():
                seen.append(m.payload)

        task = asyncio.create_task(collect())
        site = MqttClient(
            settings_for(mosquitto, "site-a", client_id="a-will", keepalive_s=5),
            will=will_message(status, b"offline"),
            on_connect=online,
        )
        async with site:
            await eventually(lambda: seen == [b"online"])
            # the link dies without a DISCONNECT packet (cable pulled): the broker sends the will
            site._client._client.socket().shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
            await eventually(lambda: seen[:2] == [b"online", b"offline"])
            # the client comes back by itself and says so
            await eventually(lambda: seen[-1:] == [b"online"] and len(seen) == 3, timeout=15)
        await asyncio.sleep(0.3)
        assert seen == [b"online", b"offline", b"online"]  # a clean close sends no will
        task.cancel()


async def test_signed_receipts_reach_only_their_site_and_verify(mosquitto) -> None:
    fed = h.make_federation()
    receipt = {
        "site": "site-a",
        "counter": 7,
        "msg_id": "site-a-u7",
        "verdict": "applied",
        "reason": None,
        "version": 12,
    }
    async with (
        MqttClient(settings_for(mosquitto, "site-a", client_id="a", protocol="3.1.1")) as site,
        MqttClient(settings_for(mosquitto, "aggregator", client_id="agg", protocol="3.1.1")) as agg,
    ):
        await site.wait_connected(10)
        await site.subscribe(T.receipts("site-a"))
        await agg.wait_connected(10)
        blob = envelope.sign_receipt(receipt, fed.aggregator)
        await agg.publish(T.receipts("site-a"), h.tampered(blob, at=-3))
        await agg.publish(T.receipts("site-a"), blob)
        verdicts, refused = [], []
        while len(verdicts) + len(refused) < 2:
            msg = await asyncio.wait_for(site.messages().__anext__(), bound(10))
            try:
                verdicts.append(envelope.verify_receipt(msg.payload, fed.agg_sign_pub))
            except WireError as exc:
                refused.append(exc.reason)
        assert verdicts == [receipt] and refused == ["signature"]


def test_tls_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="mqtts://"):
        BrokerSettings(url="http://127.0.0.1:1883").validate()
    s = BrokerSettings(url="mqtts://broker.plant:8884", ca_file="/etc/ca.crt")
    assert (s.tls, s.host, s.port) == (True, "broker.plant", 8884)
    assert BrokerSettings(url="mqtts://b").port == 8883 and BrokerSettings(url="mqtt://b").port == 1883
