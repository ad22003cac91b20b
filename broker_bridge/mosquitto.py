"""Mosquitto 2 for a federation: configuration, ACL, password file, and a private broker process.

The ACL is the broker's half of the security story (the envelope's signatures
are the other half): a site can write only under its own ``sites/<site>/`` and
read only ``model/`` and its own receipts; the aggregator reads every update
and writes models and receipts; an optional read-only ``observer`` serves
``fedline status`` and the traffic audit. Passwords are stored as Mosquitto 2
``$7$`` hashes (PBKDF2-SHA512), generated here so no ``mosquitto_passwd`` is
needed to deploy.
"""
from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from broker_bridge.errors import FedlineError
from broker_bridge.keys import write_private, write_public
from broker_bridge.topics import Topics, validate_site_id

AGGREGATOR_USER = "aggregator"
OBSERVER_USER = "observer"
RESERVED_USERS = (AGGREGATOR_USER, OBSERVER_USER)


def password_hash(password: str, *, salt: bytes | None = None, iterations: int = 101) -> str:
    """A Mosquitto 2 password-file hash: ``$7$<iterations>$<salt>$<PBKDF2-SHA512>``."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    dk = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def render_acl(topics: Topics, aggregator_user: str = AGGREGATOR_USER,
               observer_user: str | None = OBSERVER_USER) -> str:
    """The ACL file text for one federation (patterns use ``%u``, the username = site id)."""
    r = topics.root
    lines = [
        f"# fedline ACL for federation {topics.federation!r}: generated, do not edit by hand.",
        "# Anonymous clients get nothing (no topic lines before the first 'user').",
        "",
        f"user {aggregator_user}",
        f"topic read {r}/sites/+/update/#",
        f"topic read {r}/sites/+/status",
        f"topic readwrite {r}/sites/+/receipts",
        f"topic readwrite {r}/model/#",
        f"topic readwrite {r}/secagg/#",
        f"topic write {r}/sites/+/secagg/request",
        f"topic read {r}/sites/+/secagg/reply",
        "",
    ]
    if observer_user:
        lines += [f"user {observer_user}", f"topic read {r}/#", ""]
    lines += [
        "# Every site (username = site id): its own updates and status, its own receipts, the model.",
        f"pattern write {r}/sites/%u/update/#",
        f"pattern readwrite {r}/sites/%u/status",
        f"pattern read {r}/sites/%u/receipts",
        f"pattern read {r}/model/#",
        "# Secure aggregation: cohort and survivors announcements, its own unmask requests and replies.",
        f"pattern read {r}/secagg/#",
        f"pattern read {r}/sites/%u/secagg/request",
        f"pattern write {r}/sites/%u/secagg/reply",
        "",
    ]
    return "\n".join(lines)


@dataclass
class MosquittoConfig:
    """What :func:`write_broker_config` needs to know."""

    federation: str
    sites: list[str]
    port: int = 1883
    bind: str = "127.0.0.1"
    prefix: str = "fedline"
    persistence: bool = True
    autosave_interval_s: int = 5
    max_packet_size: int | None = None
    tls_port: int | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    require_client_cert: bool = False
    passwords: dict[str, str] = field(default_factory=dict)  # user -> password; generated when missing
    observer: bool = True
    log_file: str | None = None
    run_as_user: str | None = None  # mosquitto started as root drops to this user ('mosquitto' by default)


def write_broker_config(cfg: MosquittoConfig, out_dir: str | Path) -> dict[str, Path]:
    """Write mosquitto.conf, acl, passwd and credentials/<user>.password into ``out_dir``.

    Returns the paths written. Existing passwords in ``cfg.passwords`` are
    kept; missing ones are generated (random, 24 bytes).
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    topics = Topics(cfg.federation, cfg.prefix)
    for s in cfg.sites:
        validate_site_id(s)
        if s in RESERVED_USERS:
            raise FedlineError(f"site id {s!r} is reserved for the broker's {s} user")
    users = [AGGREGATOR_USER, *([OBSERVER_USER] if cfg.observer else []), *cfg.sites]
    creds = out / "credentials"
    written: dict[str, Path] = {}
    hashes = []
    for user in users:
        pw = cfg.passwords.get(user) or secrets.token_urlsafe(24)
        cfg.passwords[user] = pw
        path = creds / f"{user}.password"
        write_private(path, pw + "\n")
        written[f"password:{user}"] = path
        hashes.append(f"{user}:{password_hash(pw)}")
    passwd = out / "passwd"
    write_private(passwd, "\n".join(hashes) + "\n")
    acl = out / "acl"
    write_public(acl, render_acl(topics, observer_user=OBSERVER_USER if cfg.observer else None))
    data = out / "data"
    data.mkdir(exist_ok=True)
    lines = [
        f"# Mosquitto 2 configuration for fedline federation {cfg.federation!r} (generated).",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {passwd}",
        f"acl_file {acl}",
        f"persistence {'true' if cfg.persistence else 'false'}",
        f"persistence_location {data}/",
        f"autosave_interval {cfg.autosave_interval_s}",
        "# offline persistent sessions keep many chunks: do not cap them at the default 1000",
        "max_queued_messages 100000",
        "max_inflight_messages 64",
        "# QoS 1 messages to offline sessions are kept; sessions expire as the client asks",
        "persistent_client_expiration 14d",
        f"log_dest {'file ' + cfg.log_file if cfg.log_file else 'stderr'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
    ]
    if cfg.run_as_user:
        lines.append(f"user {cfg.run_as_user}")
    if cfg.max_packet_size:
        lines.append(f"max_packet_size {cfg.max_packet_size}")
    lines += ["", f"listener {cfg.port} {cfg.bind}", "protocol mqtt"]
    if cfg.tls_port:
        if not (cfg.ca_file and cfg.cert_file and cfg.key_file):
            raise FedlineError("a TLS listener needs ca_file, cert_file and key_file")
        lines += ["", f"listener {cfg.tls_port} {cfg.bind}", "protocol mqtt",
                  f"cafile {cfg.ca_file}", f"certfile {cfg.cert_file}", f"keyfile {cfg.key_file}",
                  f"require_certificate {'true' if cfg.require_client_cert else 'false'}"]
    conf = out / "mosquitto.conf"
    write_public(conf, "\n".join(lines) + "\n")
    written.update(conf=conf, acl=acl, passwd=passwd, data=data)
    return written


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (good enough for tests and the demo)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str | None:
    """Path of the mosquitto broker binary, or None when it is not installed."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)


class MosquittoProcess:
    """A private Mosquitto on a loopback port, for tests and the demo.

    ``start()`` returns when the port accepts connections; ``stop()`` ends it
    gracefully (it saves its persistence file), ``kill()`` with SIGKILL, and
    ``restart()`` brings it back on the same port with the same data.
    """

    def __init__(self, workdir: str | Path, federation: str = "test", sites: list[str] | None = None,
                 port: int | None = None, **config: object) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        config.setdefault("run_as_user", getpass.getuser())  # keep access to our own 0600 files
        self.config = MosquittoConfig(federation=federation, sites=list(sites or []), port=self.port,
                                      log_file=str(self.workdir / "mosquitto.log"), **config)  # type: ignore[arg-type]
        self.paths = write_broker_config(self.config, self.workdir)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def password(self, user: str) -> str:
        return self.config.passwords[user]

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        binary = mosquitto_binary()
        if binary is None:
            raise FedlineError("mosquitto is not installed (apt-get install mosquitto)")
        self.proc = subprocess.Popen([binary, "-c", str(self.paths["conf"])], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise FedlineError(f"mosquitto exited with {self.proc.returncode}; see {self.workdir}/mosquitto.log")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise FedlineError(f"mosquitto did not listen on port {self.port} within {timeout} s")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
