"""Fixtures for the adapter tests: free ports, pseudo-terminal pairs (socat),
and a plain anonymous Mosquitto for Sparkplug / MQTT JSON (the lead's
``mosquitto`` fixture enforces fedline's ACL, which has no spBv1.0 topics)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from broker_bridge.mosquitto import free_port, mosquitto_binary


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the adapter tests that need a Mosquitto binary ``broker`` (as tests/conftest.py does)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents and {"broker", "plain_mosquitto"} & set(
            getattr(item, "fixturenames", ())
        ):
            item.add_marker(pytest.mark.broker)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def pty_pair(tmp_path: Path):
    """Two linked pseudo-terminals (a null-modem cable), made by socat."""
    socat = shutil.which("socat")
    if socat is None:
        pytest.fail("these tests need socat: apt-get install socat")
    a, b = tmp_path / "ttyA", tmp_path / "ttyB"
    proc = subprocess.Popen(
        [socat, f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 5
    while not (a.exists() and b.exists()):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("socat did not create the pty pair")
        time.sleep(0.02)
    yield str(a), str(b)
    proc.terminate()
    proc.wait(5)


class PlainMosquitto:
    """An anonymous Mosquitto on a fixed loopback port that can be stopped and started again."""

    def __init__(self, workdir: Path) -> None:
        binary = mosquitto_binary()
        if binary is None:
            pytest.fail("this test needs the mosquitto broker: apt-get install mosquitto")
        self.binary = binary
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    pytest.fail("mosquitto did not start")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self.proc = None


@pytest.fixture
def broker(tmp_path: Path):
    """A plain Mosquitto (see :class:`PlainMosquitto`), started."""
    b = PlainMosquitto(tmp_path)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def plain_mosquitto(broker: PlainMosquitto) -> str:
    """The URL of a plain anonymous Mosquitto."""
    return broker.url


async def take(source, n: int, timeout: float = 10.0, pred=lambda s: True):
    """The first ``n`` samples of ``source`` matching ``pred`` (fails after ``timeout``)."""
    out = []

    agen = source.__aiter__()

    async def run():
        async for s in agen:
            if pred(s):
                out.append(s)
                if len(out) >= n:
                    return

    try:
        await asyncio.wait_for(run(), timeout)
    finally:
        await agen.aclose()
    return out
