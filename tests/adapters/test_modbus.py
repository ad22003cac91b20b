"""Modbus TCP and RTU against real pymodbus servers."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import asdict

import pytest

from fedline.testing.patience import bound
from firmware_adapters import build_source
from firmware_adapters.plc_sim import RegisterServer
from firmware_adapters.registers import RegisterMap, TagSpec, plan_reads

from .conftest import take

VALUES = {
    "int16": -12345,
    "uint16": 54321,
    "int32": -123456789,
    "uint32": 3_000_000_000,
    "int64": -(2**62) - 12345,  # beyond 2**53: exact only as an int
    "uint64": 2**64 - 3,
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
                    tag = TagSpec(
                        name=f"{table}.{dtype}.{word_order}.{byte_order}",
                        table=table,
                        address=addr[table],
                        type=dtype,
                        word_order=word_order,
                        byte_order=byte_order,
                    )
                    tags.append(tag)
                    addr[table] += tag.words
    tags += [
        TagSpec(name="text", table="holding", address=addr["holding"], type="string", length=5),
        TagSpec(
            name="text.swapped", table="input", address=addr["input"], type="string", length=3, byte_order="little"
        ),
        TagSpec(name="scaled", table="holding", address=addr["holding"] + 5, type="uint16", scale=0.1, offset=-40.0),
        TagSpec(name="coil.3", table="coil", address=3, type="bool"),
        TagSpec(name="coil.4", table="coil", address=4, type="bool"),
        TagSpec(name="discrete.0", table="discrete", address=0, type="bool"),
    ]
    return RegisterMap(tags=tags)


def tcp_table(port: int, **extra) -> dict:
    return {
        "kind": "modbus_tcp",
        "name": "plc",
        "host": "127.0.0.1",
        "port": port,
        "poll_interval_s": 0.05,
        "timeout_s": 0.5,
        "reconnect_initial_s": 0.05,
        "reconnect_max_s": 0.2,
        **extra,
    }


async def test_every_type_and_both_word_orders_read_back(port: int) -> None:
    regmap = all_types_map()
    expected = {}
    async with RegisterServer(regmap, port=port) as server:
        for tag in regmap.tags:
            if tag.table in ("coil", "discrete"):
                value = tag.name != "coil.4"
            elif tag.name == "scaled":
                value = 21.5
            elif tag.type == "string":
                value = "Typ-M7" if tag.name == "text" else "Lµ"  # 6 bytes in 5 registers; 3 bytes in 3
            else:
                value = VALUES[tag.type]
            await server.write(tag, value)
            expected[tag.name] = value
        source = build_source(tcp_table(port, tags=[asdict(t) for t in regmap.tags]))
        (sample,) = await take(source, 1)
    assert sample.good
    for name, value in expected.items():
        if isinstance(value, float):
            assert sample.values[name] == pytest.approx(value, rel=0, abs=1e-9), name
        else:  # ints (64-bit ones exactly), bools and strings
            assert sample.values[name] == value and type(sample.values[name]) is type(value), name
    assert isinstance(sample.values["holding.int32.little.big"], int)
    assert sample.values["holding.int64.little.little"] == -(2**62) - 12345  # exact, not via float
    assert sample.values["input.uint64.big.big"] == 2**64 - 3
    assert sample.values["coil.4"] is False and sample.values["coil.3"] is True
    # the 2 x 40 register tags (+ strings) of each table fit one request per table, plus one each for bits
    assert source.requests_per_poll() == {"default": 4}


async def test_word_and_byte_order_match_the_wire_layout(port: int) -> None:
    """Registers laid out by hand (not by our encoder) decode as the PLC manual says."""
    f32 = struct.pack(">f", 1.5)  # 3F C0 00 00
    i32 = struct.pack(">i", 0x12345678)
    words = lambda b: [int.from_bytes(b[i : i + 2], "big") for i in range(0, len(b), 2)]
    layouts = {
        ("big", "big"): words(f32) + words(i32),  # ABCD
        ("little", "big"): words(f32)[::-1] + words(i32)[::-1],  # CDAB (word swap)
        ("big", "little"): [((w & 0xFF) << 8) | (w >> 8) for w in words(f32) + words(i32)],  # BADC
    }
    tags = []
    for i, (wo, bo) in enumerate(layouts):
        tags.append(
            TagSpec(name=f"f.{wo}.{bo}", table="holding", address=i * 4, type="float32", word_order=wo, byte_order=bo)
        )
        tags.append(
            TagSpec(name=f"i.{wo}.{bo}", table="holding", address=i * 4 + 2, type="int32", word_order=wo, byte_order=bo)
        )
    regmap = RegisterMap(tags=tags)
    async with RegisterServer(regmap, port=port) as server:
        for i, raw in enumerate(layouts.values()):
            await server.write_raw("holding", i * 4, raw)
        source = build_source(tcp_table(port, tags=[asdict(t) for t in tags]))
        (sample,) = await take(source, 1)
    for wo, bo in layouts:
        assert sample.values[f"f.{wo}.{bo}"] == 1.5
        assert sample.values[f"i.{wo}.{bo}"] == 0x12345678


async def test_64_bit_integers_and_strings_match_the_wire_layout(port: int) -> None:
    """int64 / uint64 / string registers laid out by hand from struct and bytes, as a PLC manual shows them."""
    words = lambda b: [int.from_bytes(b[i : i + 2], "big") for i in range(0, len(b), 2)]
    i64, u64 = struct.pack(">q", -2), struct.pack(">Q", 0x0102030405060708)
    tags = [
        TagSpec(name="i64", table="holding", address=0, type="int64"),
        TagSpec(name="u64.cdab", table="holding", address=4, type="uint64", word_order="little"),
        TagSpec(name="s", table="holding", address=8, type="string", length=4),
        TagSpec(name="s.badc", table="holding", address=12, type="string", length=2, byte_order="little"),
        TagSpec(name="bad", table="input", address=0, type="string", length=1),
    ]
    regmap = RegisterMap(tags=tags)
    async with RegisterServer(regmap, port=port) as server:
        await server.write_raw("holding", 0, words(i64))  # FF FF FF FF FF FF FF FE
        await server.write_raw("holding", 4, words(u64)[::-1])  # word-swapped: 0708 0506 0304 0102
        await server.write_raw("holding", 8, words(b"L-17\0\0\0\0"))  # NUL-padded
        await server.write_raw("holding", 12, [0x4241, 0x0043])  # "ABC" with bytes swapped in each word
        source = build_source(tcp_table(port, tags=[asdict(t) for t in tags if t.name != "bad"]))
        (sample,) = await take(source, 1)
        assert sample.values == {"i64": -2, "u64.cdab": 0x0102030405060708, "s": "L-17", "s.badc": "ABC"}
        await server.write_raw("input", 0, [0xFFFE])  # not UTF-8: a bad read that says why, not a guess
        source = build_source(tcp_table(port, tags=[asdict(tags[-1])]))
        (bad,) = await take(source, 1)
    assert not bad.good and "'bad' (string)" in (bad.error or "") and "utf-8" in (bad.error or "")
    assert source.stats.bad_reads == 1


def test_string_and_64_bit_tags_are_validated() -> None:
    from fedline.config import ConfigError

    for tag, why in [
        ({"type": "string"}, "needs `length`"),
        ({"type": "string", "length": 2, "scale": 2.0}, "no scale"),
        ({"type": "int64", "length": 2}, "string tags only"),
    ]:
        with pytest.raises(ConfigError) as info:
            build_source(
                tcp_table(502, tags=[{"name": "t", "table": "holding", "address": 0, **tag}]), file="site.toml"
            )
        assert why in info.value.message, info.value.message
    assert TagSpec(name="t", table="input", address=0, type="uint64").words == 4


def test_adjacent_registers_are_merged_within_the_125_register_limit() -> None:
    tags = [TagSpec(name=f"r{i}", table="holding", address=i, type="uint16") for i in range(130)]
    tags += [TagSpec(name="far", table="holding", address=500, type="float32")]
    tags += [TagSpec(name="in", table="input", address=0, type="float64")]
    blocks = plan_reads(tags)
    assert [(b.table, b.address, b.count) for b in blocks] == [
        ("holding", 0, 125),
        ("holding", 125, 5),
        ("holding", 500, 2),
        ("input", 0, 4),
    ]
    assert [
        (b.address, b.count) for b in plan_reads([*tags[:3], TagSpec(name="g", table="holding", address=5)], max_gap=2)
    ] == [(0, 6)]
    # a float32 is never split across two requests
    edge = [TagSpec(name=f"r{i}", table="holding", address=i) for i in range(124)] + [
        TagSpec(name="f", table="holding", address=124, type="float32")
    ]
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
        back = await asyncio.wait_for(agen.__anext__(), bound(10))
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
        source = build_source(
            tcp_table(port, tags=[asdict(good), asdict(missing)], group_intervals_s={"fast": 0.02, "slow": 0.05})
        )
        samples = await take(source, 12)
    bad = [s for s in samples if not s.good]
    assert bad and all("input@900" in (s.error or "") for s in bad)
    assert any(s.good and s.values == {"ok": 7} for s in samples[samples.index(bad[0]) :])
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
        source = build_source(
            {
                "kind": "modbus_rtu",
                "name": "rtu",
                "port": client_end,
                "baudrate": 38400,
                "device_id": 3,
                "poll_interval_s": 0.05,
                "timeout_s": 1.0,
                "tags": [asdict(temp), asdict(alarm)],
            }
        )
        samples = await take(source, 2, pred=lambda s: s.good)
    finally:
        await server.stop()
    assert samples[-1].values == {"temp": 21.25, "alarm": True}
