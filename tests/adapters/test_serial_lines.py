"""Serial-line sensors over a real pseudo-terminal pair (socat)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import serial

from fedline.testing.patience import bound
from firmware_adapters import build_source

from .conftest import take


def line_source(port: str, **kw):
    return build_source(
        {
            "kind": "serial",
            "name": "scale",
            "port": port,
            "baudrate": 115200,
            "reconnect_initial_s": 0.05,
            "reconnect_max_s": 0.2,
            **kw,
        }
    )


@pytest.mark.parametrize(
    ("protocol", "extra", "lines"),
    [
        ("csv", {"header": True}, [b"temp,rpm,state\r\n", b"21.5,1500,ok\r\n", b"22,1490,ok\n"]),
        ("csv", {"columns": ["temp", "rpm", "state"], "delimiter": ";"}, [b"21.5;1500;ok\n", b"22;1490;ok\n"]),
        ("jsonl", {}, [b'{"temp": 21.5, "rpm": 1500, "state": "ok"}\n', b'{"temp": 22, "rpm": 1490, "state": "ok"}\n']),
        ("kv", {}, [b"temp=21.5 rpm=1500 state=ok\n", b"temp=22, rpm=1490, state=ok\n"]),
    ],
)
async def test_line_protocols(pty_pair, protocol, extra, lines) -> None:
    device_end, host_end = pty_pair
    source = line_source(host_end, protocol=protocol, **extra)
    with serial.Serial(device_end, 115200) as dev:

        async def feed():
            await asyncio.sleep(0.2)  # let the source open its end first
            for line in lines:
                dev.write(line)
                dev.flush()

        feeder = asyncio.create_task(feed())
        samples = await take(source, 2)
        await feeder
    assert [s.values for s in samples] == [
        {"temp": 21.5, "rpm": 1500, "state": "ok"},
        {"temp": 22, "rpm": 1490, "state": "ok"},
    ]
    assert source.stats.reads == 2 and source.stats.bad_reads == 0


async def test_framing_errors_are_counted_and_the_reader_resynchronises(pty_pair) -> None:
    device_end, host_end = pty_pair
    source = line_source(host_end, protocol="jsonl", max_line_bytes=64, ts_key="t")
    garbage = [
        b"\xff\xfe\x00bad\n",  # undecodable bytes (wrong baud rate looks like this)
        b'{"temp": 21.5\n',  # truncated JSON
        b"[1, 2]\n",  # JSON but not an object
        b"x" * 200,  # no newline within max_line_bytes: dropped up to the next newline
        b'yyy", "temp": 99}\n',
        b'{"temp": 23.5, "t": 1700000000.5}\n',
    ]
    with serial.Serial(device_end, 115200) as dev:

        async def feed():
            await asyncio.sleep(0.2)
            for chunk in garbage:
                dev.write(chunk)
                dev.flush()
                await asyncio.sleep(0.02)

        feeder = asyncio.create_task(feed())
        samples = await take(source, 5)
        await feeder
    assert [s.good for s in samples] == [False, False, False, False, True]
    assert samples[-1].values == {"temp": 23.5} and samples[-1].ts == 1700000000.5
    assert source.stats.bad_reads == 4 == source.stats.extra["framing_errors"]


async def test_device_that_vanishes_and_returns(tmp_path: Path) -> None:
    socat = shutil.which("socat")
    a, b = tmp_path / "devA", tmp_path / "devB"

    def start_socat() -> subprocess.Popen:
        proc = subprocess.Popen(
            [socat, f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while not (a.exists() and b.exists()) and time.monotonic() < deadline:
            time.sleep(0.02)
        return proc

    proc = start_socat()
    source = line_source(str(b), protocol="kv")
    agen = source.__aiter__()
    try:
        dev = serial.Serial(str(a), 115200)
        reader = asyncio.create_task(agen.__anext__())
        await asyncio.sleep(0.2)
        dev.write(b"w=1\n")
        assert (await asyncio.wait_for(reader, 5)).values == {"w": 1}
        dev.close()
        proc.terminate()  # the USB adapter is pulled
        proc.wait(5)
        lost = await asyncio.wait_for(agen.__anext__(), 5)
        assert not lost.good and source.stats.gaps == 1
        await asyncio.sleep(0.3)
        proc = start_socat()  # ... and plugged back in
        dev = serial.Serial(str(a), 115200)
        reader = asyncio.create_task(agen.__anext__())

        async def feed():
            while not reader.done():
                dev.write(b"w=2\n")
                await asyncio.sleep(0.05)

        feeder = asyncio.create_task(feed())
        back = await asyncio.wait_for(reader, bound(10))
        await feeder
        dev.close()
        assert back.values == {"w": 2}
        assert source.stats.reconnects == 1 and source.stats.gaps == 1
    finally:
        await agen.aclose()
        proc.terminate()
        proc.wait(5)
