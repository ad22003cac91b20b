"""free_port never returns a port twice in one process (a test setup once got one port for two listeners)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from broker_bridge import mosquitto


class _Kernel:
    """Stands in for the kernel's ephemeral-port pick: hands out ``ports`` in order, repeats included."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports

    def socket(self, *args: Any) -> _Sock:
        return _Sock(self.ports.pop(0))


class _Sock:
    def __init__(self, port: int) -> None:
        self.port = port

    def __enter__(self) -> _Sock:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def bind(self, addr: tuple[str, int]) -> None:
        assert addr[1] == 0

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def test_a_port_the_kernel_repeats_is_not_handed_out_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = _Kernel([41001, 41001, 41001, 41002])
    monkeypatch.setattr(mosquitto, "_HANDED_OUT", set())
    monkeypatch.setattr(mosquitto.socket, "socket", kernel.socket)
    first, second = mosquitto.free_port(), mosquitto.free_port()
    assert (first, second) == (41001, 41002)
    assert kernel.ports == []  # the repeats were asked again, not accepted


def test_real_ports_are_distinct_and_bindable() -> None:
    ports = [mosquitto.free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", ports[-1]))
