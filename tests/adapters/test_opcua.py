"""OPC UA against an in-process asyncua server."""
from __future__ import annotations

import asyncio
import logging

import pytest
from asyncua import Server

from firmware_adapters import build_source

logging.getLogger("asyncua").setLevel(logging.ERROR)


async def make_server(port: int):
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/fedline/")
    idx = await server.register_namespace("urn:fedline:test")
    line = await server.nodes.objects.add_object(idx, "Line1")
    temp = await line.add_variable(f"ns={idx};s=Line1.Temperature", "Temperature", 20.0)
    speed = await line.add_variable(idx, "Speed", 1500)
    await server.start()
    return server, idx, temp, speed


def opcua_table(port: int, idx: int, **kw) -> dict:
    return {"kind": "opcua", "name": "scada", "url": f"opc.tcp://127.0.0.1:{port}/fedline/",
            "sampling_interval_ms": 20, "publishing_interval_ms": 20, "timeout_s": 2.0,
            "reconnect_initial_s": 0.1, "reconnect_max_s": 0.5,
            "nodes": [{"tag": "temp", "node_id": f"ns={idx};s=Line1.Temperature"},
                      {"tag": "speed", "browse_path": f"{idx}:Line1/{idx}:Speed"}], **kw}


async def next_good(agen, pred, timeout=10.0):
    async def run():
        while True:
            s = await agen.__anext__()
            if s.good and pred(s):
                return s
    return await asyncio.wait_for(run(), timeout)


async def test_subscription_yields_changes_by_node_id_and_browse_path(port: int) -> None:
    server, idx, temp, speed = await make_server(port)
    source = build_source(opcua_table(port, idx, nodes=[
        {"tag": "temp", "node_id": f"ns={idx};s=Line1.Temperature"},
        {"tag": "speed", "browse_path": f"{idx}:Line1/{idx}:Speed"},
        {"tag": "ghost", "node_id": f"ns={idx};s=NoSuchNode"},
    ]))
    agen = source.__aiter__()
    try:
        first = await asyncio.wait_for(agen.__anext__(), 10)
        assert not first.good and "ghost" in (first.error or "")  # counted, the others still subscribed
        await next_good(agen, lambda s: s.values.get("temp") == 20.0)
        await next_good(agen, lambda s: s.values.get("speed") == 1500)
        await temp.write_value(21.5)
        changed = await next_good(agen, lambda s: "temp" in s.values and s.values["temp"] != 20.0)
        assert changed.values == {"temp": 21.5} and changed.source == "scada" and changed.ts > 1.6e9
        await speed.write_value(1620)
        assert (await next_good(agen, lambda s: s.values.get("speed", 1500) != 1500)).values == {"speed": 1620}
        assert source.stats.bad_reads == 1 and source.stats.reads >= 4
    finally:
        await agen.aclose()
        await server.stop()


async def test_server_restart_is_survived(port: int) -> None:
    server, idx, temp, _ = await make_server(port)
    source = build_source(opcua_table(port, idx))
    agen = source.__aiter__()
    try:
        await next_good(agen, lambda s: s.values.get("temp") == 20.0)
        await server.stop()
        lost = await asyncio.wait_for(agen.__anext__(), 15)
        while lost.good:  # a change may already be queued
            lost = await asyncio.wait_for(agen.__anext__(), 15)
        assert "session lost" in (lost.error or "") and source.stats.gaps == 1
        server, idx, temp, _ = await make_server(port)
        await temp.write_value(30.0)
        back = await next_good(agen, lambda s: s.values.get("temp") == 30.0, timeout=20)
        assert back.values == {"temp": 30.0}
        assert source.stats.reconnects == 1 and source.stats.gaps == 1
    finally:
        await agen.aclose()
        await server.stop()


def test_security_options_need_a_certificate() -> None:
    from fedline.config import ConfigError

    with pytest.raises(ConfigError) as info:
        build_source(opcua_table(4840, 2, security_mode="SignAndEncrypt"), file="site.toml")
    assert "certificate" in info.value.message and info.value.file == "site.toml"


async def test_sign_and_encrypt_session(port: int, tmp_path) -> None:
    from asyncua import ua
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from cryptography.x509.oid import ExtendedKeyUsageOID

    for who, use in [("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)]:
        await setup_self_signed_certificate(tmp_path / f"{who}.pem", tmp_path / f"{who}.der",
                                            f"urn:fedline:test:{who}", "localhost", [use], {"organizationName": "fedline"})
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/fedline/")
    server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
    await server.load_certificate(str(tmp_path / "server.der"))
    await server.load_private_key(str(tmp_path / "server.pem"))
    idx = await server.register_namespace("urn:fedline:test")
    level = await server.nodes.objects.add_variable(f"ns={idx};s=Tank.Level", "Level", 0.5)
    await server.start()
    site = tmp_path / "site.toml"  # certificate paths are relative to the site file
    secure = build_source({"kind": "opcua", "url": f"opc.tcp://127.0.0.1:{port}/fedline/",
                           "security_mode": "SignAndEncrypt", "security_policy": "Basic256Sha256",
                           "certificate": "client.der", "private_key": "client.pem",
                           "server_certificate": "server.der",
                           "sampling_interval_ms": 20, "publishing_interval_ms": 20,
                           "nodes": [{"tag": "level", "node_id": f"ns={idx};s=Tank.Level"}]}, file=site)
    plain = build_source(opcua_table(port, idx, nodes=[{"tag": "level", "node_id": f"ns={idx};s=Tank.Level"}]))
    agen, pagen = secure.__aiter__(), plain.__aiter__()
    try:
        assert (await next_good(agen, lambda s: True)).values == {"level": 0.5}
        await level.write_value(0.75)
        assert (await next_good(agen, lambda s: s.values["level"] != 0.5)).values == {"level": 0.75}
        refused = await asyncio.wait_for(pagen.__anext__(), 10)  # no unencrypted endpoint: refused, counted
        assert not refused.good and plain.stats.gaps == 1
    finally:
        await agen.aclose()
        await pagen.aclose()
        await server.stop()
