"""The generated broker defends itself, checked against a real Mosquitto started on the config
``fedline broker config`` writes: TLS only (plaintext only when asked, and only on loopback),
client ids bound to usernames, packet and queue limits enforced and counted."""

from __future__ import annotations

import getpass
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker_bridge.mosquitto import MosquittoConfig, _accepts, free_port, mosquitto_binary, write_broker_config
from broker_bridge.topics import Topics
from fedline.cli import main
from fedline.config import ConfigError
from fedline.testing.patience import bound

T = Topics("test")
SITES = ["site-a", "site-b"]
pytestmark = [pytest.mark.timeout(90), pytest.mark.broker]


def _listeners(conf: Path) -> list[tuple[int, str, bool]]:
    """(port, address, has TLS) of every listener in a mosquitto.conf."""
    out: list[tuple[int, str, bool]] = []
    for line in conf.read_text().splitlines():
        if line.startswith("listener "):
            _, port, addr = line.split()
            out.append((int(port), addr, False))
        elif line.startswith("certfile ") and out:
            out[-1] = (*out[-1][:2], True)
    return out


def test_generated_config_has_no_plaintext_listener_unless_asked(tmp_path: Path, capsys) -> None:
    assert main(["broker", "config", "--federation", "test", "--site", "site-a", "--out", str(tmp_path / "a")]) == 0
    conf = tmp_path / "a" / "mosquitto.conf"
    assert _listeners(conf) == [(8883, "127.0.0.1", True)]
    assert "use_username_as_clientid true" in conf.read_text()
    assert (tmp_path / "a" / "pki" / "ca.key").stat().st_mode & 0o077 == 0
    assert (tmp_path / "a" / "credentials" / "site-a.line.password").stat().st_mode & 0o077 == 0

    assert (
        main(
            [
                "broker",
                "config",
                "--federation",
                "test",
                "--site",
                "site-a",
                "--out",
                str(tmp_path / "b"),
                "--bind",
                "0.0.0.0",
                "--plain-port",
                "1884",
            ]
        )
        == 0
    )
    assert _listeners(tmp_path / "b" / "mosquitto.conf") == [(8883, "0.0.0.0", True), (1884, "127.0.0.1", False)]

    rc = main(
        [
            "broker",
            "config",
            "--federation",
            "test",
            "--site",
            "site-a",
            "--out",
            str(tmp_path / "c"),
            "--plain-port",
            "1884",
            "--plain-bind",
            "0.0.0.0",
        ]
    )
    assert rc == 78 and "loopback" in capsys.readouterr().err
    assert not (tmp_path / "c" / "mosquitto.conf").exists()


def test_an_existing_ca_is_kept_and_the_certificate_reissued_for_new_hosts(tmp_path: Path) -> None:
    out = tmp_path / "b"
    main(["broker", "config", "--federation", "test", "--site", "site-a", "--out", str(out)])
    ca = (out / "pki" / "ca.crt").read_bytes()
    cert = (out / "pki" / "server.crt").read_bytes()
    main(["broker", "config", "--federation", "test", "--site", "site-a", "--out", str(out), "--keep-passwords"])
    assert (out / "pki" / "server.crt").read_bytes() == cert  # nothing to change
    main(
        [
            "broker",
            "config",
            "--federation",
            "test",
            "--site",
            "site-a",
            "--out",
            str(out),
            "--keep-passwords",
            "--host",
            "broker.plant.example",
            "--host",
            "10.1.2.3",
        ]
    )
    assert (out / "pki" / "ca.crt").read_bytes() == ca  # sites keep trusting the same CA
    text = subprocess.run(
        ["openssl", "x509", "-noout", "-text", "-in", str(out / "pki" / "server.crt")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "DNS:broker.plant.example" in text and "IP Address:10.1.2.3" in text
    subprocess.run(
        ["openssl", "verify", "-CAfile", str(out / "pki" / "ca.crt"), str(out / "pki" / "server.crt")],
        check=True,
        capture_output=True,
    )


def test_operator_files_must_come_together() -> None:
    with pytest.raises(ConfigError, match="all of ca_file"):
        MosquittoConfig("test", [], ca_file="/x/ca.crt").validate()


class Broker:
    """A real Mosquitto on the config the CLI generates (TLS, bound ids, small limits for the test)."""

    def __init__(self, root: Path, **limits: int) -> None:
        if mosquitto_binary() is None:
            pytest.fail("this test needs mosquitto (apt-get install mosquitto)")
        self.port = free_port()
        self.cfg = MosquittoConfig(
            "test",
            SITES,
            port=self.port,
            run_as_user=getpass.getuser(),
            log_file=str(root / "mosquitto.log"),
            sys_interval_s=1,
            **limits,
        )
        self.paths = write_broker_config(self.cfg, root)
        self.log = root / "mosquitto.log"
        self.proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.paths["conf"])],  # type: ignore[list-item]
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _accepts(self.port):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def client(self, user: str, client_id: str, *, tls: bool = True, clean: bool = False) -> Probe:
        return Probe(self, user, client_id, tls=tls, clean=clean)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(bound(10))


class Probe:
    """A bare paho MQTT 5 client that records what the broker does to it."""

    def __init__(self, broker: Broker, user: str, client_id: str, *, tls: bool, clean: bool) -> None:
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        self.c.username_pw_set(user, broker.cfg.passwords[user])
        if tls:
            self.c.tls_set(ca_certs=str(broker.paths["ca"]), cert_reqs=ssl.CERT_REQUIRED)
        self.connected = threading.Event()
        self.disconnects: list[int] = []
        self.received: list[bytes] = []
        self.subscribed = threading.Event()
        self.c.on_connect = lambda c, u, f, rc, p: self.connected.set() if not rc.is_failure else None
        self.c.on_disconnect = lambda c, u, f, rc, p: self.disconnects.append(rc.value)
        self.c.on_message = lambda c, u, m: self.received.append(m.payload)
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0 if clean else 3600
        self.c.connect("127.0.0.1", broker.port, clean_start=clean, properties=props)
        self.c.loop_start()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def broker(tmp_path: Path):
    b = Broker(tmp_path / "broker", max_packet_size=32 * 1024, max_queued_messages=10)
    yield b
    b.stop()


def test_tls_only_plaintext_refused_and_ids_bound(broker: Broker) -> None:
    agg = broker.client("aggregator", "fedline-aggregator-test")
    assert agg.connected.wait(10)
    # a plaintext client on the TLS listener gets no MQTT session
    plain = broker.client("site-a", "plain", tls=False)
    assert not plain.connected.wait(2)
    plain.close()
    # a site that asks for the aggregator's client id is given its own (its username) instead:
    # the aggregator keeps its connection and session
    thief = broker.client("site-a", "fedline-aggregator-test")
    assert thief.connected.wait(10)
    time.sleep(1.0)
    assert agg.disconnects == [] and agg.c.is_connected()
    log = broker.log.read_text()
    assert "as site-a (p5" in log and "already connected" not in log
    thief.close()
    agg.close()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _s(text: str) -> bytes:
    return len(text.encode()).to_bytes(2, "big") + text.encode()


def test_oversized_packet_refused_with_reason_code(broker: Broker) -> None:
    """A PUBLISH announcing more than max_packet_size gets DISCONNECT 0x95 (Packet too large).

    Raw MQTT 5 over TLS, and only the fixed header is sent: the broker judges the
    announced length, and no half-written body races its DISCONNECT."""
    ctx = ssl.create_default_context(cafile=str(broker.paths["ca"]))
    with (
        socket.create_connection(("127.0.0.1", broker.port), 10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        body = (
            _s("MQTT")
            + bytes([5, 0xC2])
            + (60).to_bytes(2, "big")
            + b"\x00"
            + _s("site-a")
            + _s("site-a")
            + _s(broker.cfg.passwords["site-a"])
        )
        tls.sendall(b"\x10" + _varint(len(body)) + body)
        connack = tls.recv(64)
        assert connack[0] == 0x20 and connack[3] == 0  # accepted
        tls.sendall(b"\x32" + _varint(broker.cfg.max_packet_size + 1))
        reply = tls.recv(64)
    assert reply[0] == 0xE0 and reply[2] == 0x95, reply  # DISCONNECT, reason code Packet too large


def test_backlog_past_the_queue_limit_is_dropped_and_counted(broker: Broker) -> None:
    agg = broker.client("aggregator", "agg")
    assert agg.connected.wait(10)
    agg.c.subscribe(T.updates_filter(), qos=1)
    assert agg.subscribed.wait(10)
    agg.close()  # offline, persistent session: the broker queues for it
    time.sleep(0.3)
    site = broker.client("site-a", "site-a")
    assert site.connected.wait(10)
    for i in range(100):
        site.c.publish(T.update_chunk("site-a", f"m{i}", 0), f"{i}".encode(), qos=1).wait_for_publish(10)
    obs = broker.client("observer", "obs", clean=True)
    assert obs.connected.wait(10)
    obs.c.subscribe("$SYS/broker/publish/messages/dropped")
    back = broker.client("aggregator", "agg")
    assert back.connected.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (obs.received and int(obs.received[-1]) >= 100 - len(back.received)):
        time.sleep(0.1)
    got = len(back.received)
    assert 0 < got < 100  # the limit held: the aggregator's session did not grow without bound
    assert int(obs.received[-1]) == 100 - got  # every dropped message is counted by the broker
    assert "Outgoing messages are being dropped for client agg" in broker.log.read_text()
    for p in (site, obs, back):
        p.close()
