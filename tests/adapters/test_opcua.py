"""OPC UA against an in-process asyncua server that offers only Basic256Sha256 SignAndEncrypt.

Every source here runs with the default security (no ``security_mode`` key),
with a client certificate made by ``fedline opcua-cert``'s function; the one
plain-text source asks for ``security_mode = "None"`` and is refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from pathlib import Path

import pytest
from asyncua import Server, ua

from fedline.testing.patience import bound
from firmware_adapters import build_source
from firmware_adapters.opcua_cert import application_uri_of, make_client_certificate

logging.getLogger("asyncua").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """Server and client certificates, made once per module (RSA key generation is slow)."""
    from cryptography.x509.oid import ExtendedKeyUsageOID

    d = tmp_path_factory.mktemp("pki")
    make_client_certificate(d, name="client", application_uri="urn:fedline:test:client", hostname="localhost")
    asyncio.run(_server_cert(d, ExtendedKeyUsageOID.SERVER_AUTH))
    return d


async def _server_cert(d: Path, use) -> None:
    from asyncua.crypto.cert_gen import setup_self_signed_certificate

    await setup_self_signed_certificate(
        d / "server.pem",
        d / "server.der",
        "urn:fedline:test:server",
        "localhost",
        [use],
        {"organizationName": "fedline"},
    )


async def make_server(port: int, pki: Path):
    """A server with SignAndEncrypt as its only endpoint policy: a plain client cannot connect."""
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/fedline/")
    server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
    await server.load_certificate(str(pki / "server.der"))
    await server.load_private_key(str(pki / "server.pem"))
    idx = await server.register_namespace("urn:fedline:test")
    line = await server.nodes.objects.add_object(idx, "Line1")
    temp = await line.add_variable(f"ns={idx};s=Line1.Temperature", "Temperature", 20.0)
    speed = await line.add_variable(idx, "Speed", 1500)
    await server.start()
    return server, idx, temp, speed


def opcua_table(port: int, idx: int, pki: Path | None = None, **kw) -> dict:
    """A source table with the default security: only the client's certificate and key are given."""
    keys = {"certificate": str(pki / "client.der"), "private_key": str(pki / "client.pem")} if pki else {}
    return {
        "kind": "opcua",
        "name": "scada",
        "url": f"opc.tcp://127.0.0.1:{port}/fedline/",
        "sampling_interval_ms": 20,
        "publishing_interval_ms": 20,
        "timeout_s": 2.0,
        "reconnect_initial_s": 0.1,
        "reconnect_max_s": 0.5,
        "nodes": [
            {"tag": "temp", "node_id": f"ns={idx};s=Line1.Temperature"},
            {"tag": "speed", "browse_path": f"{idx}:Line1/{idx}:Speed"},
        ],
        **keys,
        **kw,
    }


def channels(server: Server) -> list[tuple[str, ua.MessageSecurityMode]]:
    """The security policy and mode of every channel the server holds open (asyncua's internals)."""
    out = []
    for proto in server.bserver.clients:
        policy = proto.processor._connection.security_policy
        out.append((policy.URI.rsplit("#", 1)[-1], policy.Mode))
    return out


async def next_good(agen, pred, timeout=10.0):
    async def run():
        while True:
            s = await agen.__anext__()
            if s.good and pred(s):
                return s

    return await asyncio.wait_for(run(), timeout)


async def test_subscription_yields_changes_by_node_id_and_browse_path(port: int, pki: Path) -> None:
    server, idx, temp, speed = await make_server(port, pki)
    source = build_source(
        opcua_table(
            port,
            idx,
            pki,
            nodes=[
                {"tag": "temp", "node_id": f"ns={idx};s=Line1.Temperature"},
                {"tag": "speed", "browse_path": f"{idx}:Line1/{idx}:Speed"},
                {"tag": "ghost", "node_id": f"ns={idx};s=NoSuchNode"},
            ],
        )
    )
    agen = source.__aiter__()
    try:
        first = await asyncio.wait_for(agen.__anext__(), bound(10))
        assert not first.good and "ghost" in (first.error or "")  # counted, the others still subscribed
        await next_good(agen, lambda s: s.values.get("temp") == 20.0)
        await next_good(agen, lambda s: s.values.get("speed") == 1500)
        await temp.write_value(21.5)
        changed = await next_good(agen, lambda s: "temp" in s.values and s.values["temp"] != 20.0)
        assert changed.values == {"temp": 21.5} and changed.source == "scada" and changed.ts > 1.6e9
        await speed.write_value(1620)
        assert (await next_good(agen, lambda s: s.values.get("speed", 1500) != 1500)).values == {"speed": 1620}
        assert source.stats.bad_reads == 1 and source.stats.reads >= 4
        assert source.cfg.security_mode == "SignAndEncrypt"  # the default
        assert channels(server) == [("Basic256Sha256", ua.MessageSecurityMode.SignAndEncrypt)]
    finally:
        await agen.aclose()
        await server.stop()


async def test_server_restart_is_survived(port: int, pki: Path) -> None:
    server, idx, temp, _ = await make_server(port, pki)
    source = build_source(opcua_table(port, idx, pki))
    agen = source.__aiter__()
    try:
        await next_good(agen, lambda s: s.values.get("temp") == 20.0)
        await server.stop()
        lost = await asyncio.wait_for(agen.__anext__(), bound(15))
        while lost.good:  # a change may already be queued
            lost = await asyncio.wait_for(agen.__anext__(), bound(15))
        assert "session lost" in (lost.error or "") and source.stats.gaps == 1
        server, idx, temp, _ = await make_server(port, pki)
        await temp.write_value(30.0)
        back = await next_good(agen, lambda s: s.values.get("temp") == 30.0, timeout=20)
        assert back.values == {"temp": 30.0}
        assert source.stats.reconnects == 1 and source.stats.gaps == 1
    finally:
        await agen.aclose()
        await server.stop()


def test_security_is_on_by_default_and_none_only_when_asked() -> None:
    from fedline.config import ConfigError

    with pytest.raises(ConfigError) as info:  # no security_mode key: SignAndEncrypt, so a certificate is needed
        build_source(opcua_table(4840, 2), file="site.toml")
    assert "certificate" in info.value.message and "opcua-cert" in info.value.message
    assert info.value.file == "site.toml"
    assert build_source(opcua_table(4840, 2, security_mode="None")).cfg.security_mode == "None"


def test_opcua_cert_cli_writes_a_client_certificate_and_a_private_key(tmp_path: Path, capsys) -> None:
    from fedline.cli import main

    assert (
        main(
            [
                "opcua-cert",
                "--out",
                str(tmp_path / "pki"),
                "--uri",
                "urn:plant-a:collector",
                "--hostname",
                "collector.plant-a",
            ]
        )
        == 0
    )
    der, pem = tmp_path / "pki" / "client.der", tmp_path / "pki" / "client.pem"
    assert application_uri_of(der.read_bytes()) == "urn:plant-a:collector"
    assert stat.S_IMODE(os.stat(pem).st_mode) == 0o600 and b"PRIVATE KEY" in pem.read_bytes()
    assert f'certificate = "{der}"' in capsys.readouterr().out
    before = der.read_bytes()
    assert main(["opcua-cert", "--out", str(tmp_path / "pki")]) == 1  # never overwrites a trusted key by accident
    assert der.read_bytes() == before and "exists" in capsys.readouterr().err


async def test_default_security_connects_encrypted_and_plain_text_is_refused(port: int, pki: Path) -> None:
    """The default table (no security keys but the client's certificate) reads from a SignAndEncrypt-only
    server; the certificate paths are relative to the site file; a table that asks for None is refused."""
    server, idx, temp, _ = await make_server(port, pki)
    site = pki / "site.toml"
    secure = build_source(
        {
            "kind": "opcua",
            "url": f"opc.tcp://127.0.0.1:{port}/fedline/",
            "certificate": "client.der",
            "private_key": "client.pem",
            "server_certificate": "server.der",
            "sampling_interval_ms": 20,
            "publishing_interval_ms": 20,
            "nodes": [{"tag": "temp", "node_id": f"ns={idx};s=Line1.Temperature"}],
        },
        file=site,
    )
    plain = build_source(
        opcua_table(
            port, idx, security_mode="None", nodes=[{"tag": "temp", "node_id": f"ns={idx};s=Line1.Temperature"}]
        )
    )
    agen, pagen = secure.__aiter__(), plain.__aiter__()
    try:
        assert (await next_good(agen, lambda s: True)).values == {"temp": 20.0}
        await temp.write_value(21.25)
        assert (await next_good(agen, lambda s: s.values["temp"] != 20.0)).values == {"temp": 21.25}
        assert channels(server) == [("Basic256Sha256", ua.MessageSecurityMode.SignAndEncrypt)]
        refused = await asyncio.wait_for(pagen.__anext__(), bound(10))  # no unencrypted endpoint: refused, counted
        assert not refused.good and plain.stats.gaps == 1
    finally:
        await agen.aclose()
        await pagen.aclose()
        await server.stop()
