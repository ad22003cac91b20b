"""Modbus TCP and RTU against real pymodbus servers."""
from __future__ import annotations

import asyncio
import struct
from dataclasses import asdict

import pytest

from firmware_adapters import build_source
from firmware_adapters.plc_sim import RegisterServer
from firmware_adapters.registers import RegisterMap, TagSpec, plan_reads

from .conftest import take

VALUES = {
    "int16": -12345,
    "uint16": 54321,
    "int32": -123456789,
    "uint32": 3_000_000_000,
    "float32": 1234.5,  # exactly representable in float32
    "float64": -9876.54321,
}


def all_types_map() -> RegisterMap:
    """Every data type in every word/byte order, in holding and input tables, plus bits."""
    tags, addr = [], {"holding": 0, "input": 0}
    for table in ("holding", "input"):
        for word_order in ("big", "little"):
            for byte_order in ("big", "little"):
                for dtype in VALUES:
                    tag = TagSpec(name=f"{table}.{dtype}.{word_order}.{byte_order}", table=table,
                                  address=addr[table], type=dtype, word_order=word_order, byte_order=byte_order)
                    tags.append(tag)
                    addr[table] += tag.words
    tags += [
        TagSpec(name="scaled", table="holding", address=addr["holding"], type="uint16", scale=0.1, offset=-40.0),
        TagSpec(name="coil.3", table="coil", address=3, type="bool"),
        TagSpec(name="coil.4", table="coil", address=4, type="bool"),
        TagSpec(name="discrete.0", table="discrete", address=0, type="bool"),
    ]
    return RegisterMap(tags=tags)


def tcp_table(port: int, **extra) -> dict:
    return {"kind": "modbus_tcp", "name": "plc", "host": "127.0.0.1", "port": port, "poll_interval_s": 0.05,
            "timeout_s": 0.5, "reconnect_initial_s": 0.05, "reconnect_max_s": 0.2, **extra}


async def test_every_type_and_both_word_orders_read_back(port: int) -> None:
    regmap = all_types_map()
    expected = {}
    async with RegisterServer(regmap, port=port) as server:
        for tag in regmap.tags:
            if tag.table in ("coil", "discrete"):
                value = tag.name != "coil.4"
            elif tag.name == "scaled":
                value = 21.5
            else:
                value = VALUES[tag.type]
            await server.write(tag, value)
            expected[tag.name] = value
        source = build_source(tcp_table(port, tags=[asdict(t) for t in regmap.tags]))
        (sample,) = await take(source, 1)
    assert sample.good
    for name, value in expected.items():
        assert sample.values[name] == pytest.approx(value, rel=0, abs=1e-9), name
    assert isinstance(sample.values["holding.int32.little.big"], int)
    assert sample.values["coil.4"] is False and sample.values["coil.3"] is True
    # the 2 x 24 register tags of each table fit one request per table, plus one each for coils, discretes
    assert source.requests_per_poll() == {"default": 4}


async def test_word_and_byte_order_match_the_wire_layout(port: int) -> None:
    """Registers laid out by hand (not by our encoder) decode as the PLC manual says."""
    f32 = struct.pack(">f", 1.5)  # 3F C0 00 00
    i32 = struct.pack(">i", 0x12345678)
    words = lambda b: [int.from_bytes(b[i:i + 2], "big") for i in range(0, len(b), 2)]
    layouts = {
        ("big", "big"): words(f32) + words(i32),  # ABCD
        ("little", "big"): words(f32)[::-1] + words(i32)[::-1],  # CDAB (word swap)
        ("big", "little"): [((w & 0xFF) << 8) | (w >> 8) for w in words(f32) + words(i32)],  # BADC
    }
    tags = []
    for i, (wo, bo) in enumerate(layouts):
        tags.append(TagSpec(name=f"f.{wo}.{bo}", table="holding", address=i * 4, type="float32", word_order=wo, byte_order=bo))
        tags.append(TagSpec(name=f"i.{wo}.{bo}", table="holding", address=i * 4 + 2, type="int32", word_order=wo, byte_order=bo))
    regmap = RegisterMap(tags=tags)
    async with RegisterServer(regmap, port=port) as server:
        for i, raw in enumerate(layouts.values()):
            await server.write_raw("holding", i * 4, raw)
        source = build_source(tcp_table(port, tags=[asdict(t) for t in tags]))
        (sample,) = await take(source, 1)
    for wo, bo in layouts:
        assert sample.values[f"f.{wo}.{bo}"] == 1.5
        assert sample.values[f"i.{wo}.{bo}"] == 0x12345678


def test_adjacent_registers_are_merged_within_the_125_register_limit() -> None:
    tags = [TagSpec(name=f"r{i}", table="holding", address=i, type="uint16") for i in range(130)]
    tags += [TagSpec(name="far", table="holding", address=500, type="float32")]
    tags += [TagSpec(name="in", table="input", address=0, type="float64")]
    blocks = plan_reads(tags)
    assert [(b.table, b.address, b.count) for b in blocks] == [
        ("holding", 0, 125), ("holding", 125, 5), ("holding", 500, 2), ("input", 0, 4)]
    assert [(b.address, b.count) for b in plan_reads(tags[:3] + [TagSpec(name="g", table="holding", address=5)], max_gap=2)] == [(0, 6)]
    # a float32 is never split across two requests
    edge = [TagSpec(name=f"r{i}", table="holding", address=i) for i in range(124)] + [
        TagSpec(name="f", table="holding", address=124, type="float32")]
    assert [(b.address, b.count) for b in plan_reads(edge)] == [(0, 124), (124, 2)]


async def test_server_that_stops_and_comes_back_is_survived_with_the_gap_counted(port: int) -> None:
    tag = TagSpec(name="speed", table="holding", address=0, type="uint16")
    regmap = RegisterMap(tags=[tag])
    source = build_source(tcp_table(port, tags=[asdict(tag)]))
    agen = source.__aiter__()
    server = RegisterServer(regmap, port=port)
    await server.start()
    await server.write(tag, 1500)
    try:
        first = await asyncio.wait_for(agen.__anext__(), 5)
        assert first.good and first.values["speed"] == 1500
        await server.stop()
        bad = await asyncio.wait_for(agen.__anext__(), 5)
        assert not bad.good and "connection lost" in (bad.error or "")
        assert source.stats.gaps == 1
        await asyncio.sleep(0.3)  # a few failed reconnects while the PLC is away
        server = RegisterServer(regmap, port=port)
        await server.start()
        await server.write(tag, 1700)
        back = await asyncio.wait_for(agen.__anext__(), 10)
        assert back.good and back.values["speed"] == 1700
        assert source.stats.reconnects == 1 and source.stats.gaps == 1
        assert source.stats.reads == 2
    finally:
        await agen.aclose()
        await server.stop()


async def test_a_failed_read_is_a_counted_bad_sample_and_polling_goes_on(port: int) -> None:
    good = TagSpec(name="ok", table="holding", address=0, type="uint16", group="fast")
    missing = TagSpec(name="nowhere", table="input", address=900, type="uint16", group="slow")
    async with RegisterServer(RegisterMap(tags=[good]), port=port) as server:
        await server.write(good, 7)
        source = build_source(tcp_table(port, tags=[asdict(good), asdict(missing)],
                                        group_intervals_s={"fast": 0.02, "slow": 0.05}))
        samples = await take(source, 12)
    bad = [s for s in samples if not s.good]
    assert bad and all("input@900" in (s.error or "") for s in bad)
    assert any(s.good and s.values == {"ok": 7} for s in samples[samples.index(bad[0]):])
    assert source.stats.bad_reads == len(bad)
    assert source.stats.gaps == 0


async def test_modbus_rtu_over_a_pty_pair(pty_pair) -> None:
    server_end, client_end = pty_pair
    temp = TagSpec(name="temp", table="input", address=0, type="float32", word_order="little")
    alarm = TagSpec(name="alarm", table="coil", address=0, type="bool")
    regmap = RegisterMap(tags=[temp, alarm])
    server = RegisterServer(regmap, serial_port=server_end, baudrate=38400)
    await server.start()
    try:
        await server.write(temp, 21.25)
        await server.write(alarm, True)
        source = build_source({
            "kind": "modbus_rtu", "name": "rtu", "port": client_end, "baudrate": 38400, "device_id": 3,
            "poll_interval_s": 0.05, "timeout_s": 1.0,
            "tags": [asdict(temp), asdict(alarm)],
        })
        samples = await take(source, 2, pred=lambda s: s.good)
    finally:
        await server.stop()
    assert samples[-1].values == {"temp": 21.25, "alarm": True}
