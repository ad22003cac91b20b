"""free_port: listener ports below the kernel's ephemeral range (where outgoing connections take theirs), never one
in use, never the same one twice in one process (a test setup once got one port for two listeners; mosquitto once
found its port taken by the time it bound it)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from broker_bridge import mosquitto


class _Draws:
    """Stands in for ``secrets.randbelow``: the given indexes in order."""

    def __init__(self, indexes: list[int]) -> None:
        self.indexes = indexes

    def randbelow(self, n: int) -> int:
        i = self.indexes.pop(0)
        assert 0 <= i < n
        return i


def test_the_range_is_the_half_below_the_ephemeral_one() -> None:
    assert mosquitto.listener_ports((32768, 60999)) == range(16384, 32768)
    assert mosquitto.listener_ports((1500, 2000)) == range(1024, 1500)  # never a privileged port


def test_the_ephemeral_range_is_read_from_proc_or_defaults(tmp_path: Path) -> None:
    good, bad, missing = tmp_path / "good", tmp_path / "bad", tmp_path / "missing"
    good.write_text("40000\t50000\n")
    bad.write_text("not ports\n")
    assert mosquitto.ephemeral_range(str(good)) == (40000, 50000)
    assert mosquitto.ephemeral_range(str(bad)) == (32768, 60999)
    assert mosquitto.ephemeral_range(str(missing)) == (32768, 60999)


def test_a_port_handed_out_before_is_drawn_again(monkeypatch: pytest.MonkeyPatch) -> None:
    ports = mosquitto.listener_ports()
    draws = _Draws([5, 5, 5, 6])
    monkeypatch.setattr(mosquitto, "_HANDED_OUT", {ports[7]})
    monkeypatch.setattr(mosquitto.secrets, "randbelow", draws.randbelow)
    monkeypatch.setattr(mosquitto, "listener_ports", lambda: ports)
    assert mosquitto.free_port() == ports[5]
    assert mosquitto.free_port() == ports[6]  # the repeats of 5 were drawn again, not accepted
    assert draws.indexes == []


def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    ports = mosquitto.listener_ports()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        i = next(i for i in range(len(ports)) if _binds(taken, ports[i]))
        taken.listen()
        draws = _Draws([i, i + 1 if i + 1 < len(ports) else i - 1])
        monkeypatch.setattr(mosquitto, "_HANDED_OUT", set())
        monkeypatch.setattr(mosquitto.secrets, "randbelow", draws.randbelow)
        port = mosquitto.free_port()
        assert port != ports[i] and port in ports
        assert draws.indexes == []


def _binds(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def test_real_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    low = mosquitto.ephemeral_range()[0]
    ports = [mosquitto.free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(low // 2 <= p < low for p in ports)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", ports[-1]))
