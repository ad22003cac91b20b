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

from broker_bridge.bridge import BridgeConfig, render_bridge, render_bridge_acl
from broker_bridge.errors import FedlineError
from broker_bridge.topics import Topics, validate_site_id

AGGREGATOR_USER = "aggregator"
OBSERVER_USER = "observer"
RESERVED_USERS = (AGGREGATOR_USER, OBSERVER_USER)
INTAKE_PREFIX = "intake-"  # intake workers log in as intake-0, intake-1, ... (aggregator.intake_worker)


def intake_users(n: int) -> list[str]:
    """The broker users (and key ids) of ``n`` intake workers; none for 0 or 1 (the aggregator reads itself)."""
    return [f"{INTAKE_PREFIX}{i}" for i in range(n)] if n >= 2 else []


def password_hash(password: str, *, salt: bytes | None = None, iterations: int = 101) -> str:
    """A Mosquitto 2 password-file hash: ``$7$<iterations>$<salt>$<PBKDF2-SHA512>``."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    dk = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def render_acl(
    topics: Topics,
    aggregator_user: str = AGGREGATOR_USER,
    observer_user: str | None = OBSERVER_USER,
    sites: list[str] | None = None,
    workers: list[str] | None = None,
) -> str:
    """The ACL file text for one federation (patterns use ``%u``, the username = site id).

    ``sites``: each site's line user (``<site>.line``) may also read its site's key grant, which a line
    in manifest mode opens with the site's key file (the models are encrypted to the members).
    ``workers``: intake workers (:func:`intake_users`): each reads (and clears retained) site updates, reads
    the services' liveness (to share the sites among the live ones) and writes only its own forwards on
    ``intake/<worker>/``, which only the aggregator reads.
    """
    r = topics.root
    lines = [
        f"# fedline ACL for federation {topics.federation!r}: generated, do not edit by hand.",
        "# Anonymous clients get nothing (no topic lines before the first 'user').",
        "",
        f"user {aggregator_user}",
        "# readwrite on updates only to clear a retained message a site parked there (issue 13)",
        f"topic readwrite {r}/sites/+/update/#",
        f"topic write {r}/sites/+/fedkey",
        f"topic read {r}/sites/+/status",
        f"topic readwrite {r}/sites/+/receipts",
        f"topic readwrite {r}/model/#",
        f"topic readwrite {r}/secagg/#",
        f"topic write {r}/sites/+/secagg/request",
        f"topic read {r}/sites/+/secagg/reply",
        f"topic read {r}/sites/+/recovery/request",
        f"topic write {r}/sites/+/recovery/answer",
        f"topic read {r}/intake/#",
        "",
    ]
    for w in workers or []:
        lines += [
            f"user {w}",
            f"topic readwrite {r}/sites/+/update/#",
            f"topic read {r}/services/+/status",
            f"topic write {r}/intake/{w}/#",
            "",
        ]
    if observer_user:  # $SYS: the broker's own counters (clients, dropped messages) for monitoring
        # every subtree but intake/ (the workers' forwards are for the aggregator alone, even as ciphertext)
        lines += [
            f"user {observer_user}",
            *(f"topic read {r}/{sub}/#" for sub in ("sites", "model", "services", "secagg")),
            "topic read $SYS/broker/#",
            "",
        ]
    lines += [
        *[x for s in (sites or []) for x in (f"user {line_user(s)}", f"topic read {r}/sites/{s}/fedkey", "")],
        "# Every site (username = site id): its own updates and status, its own receipts, the model.",
        f"pattern write {r}/sites/%u/update/#",
        f"pattern readwrite {r}/sites/%u/status",
        f"pattern read {r}/sites/%u/receipts",
        f"pattern read {r}/sites/%u/fedkey",
        f"pattern read {r}/model/#",
        "# Secure aggregation: cohort and survivors announcements, its own unmask requests and replies.",
        f"pattern read {r}/secagg/#",
        f"pattern read {r}/sites/%u/secagg/request",
        f"pattern write {r}/sites/%u/secagg/reply",
        "# A site that lost its data directory: its own recovery request and the aggregator's answer.",
        f"pattern write {r}/sites/%u/recovery/request",
        f"pattern read {r}/sites/%u/recovery/answer",
        "# Every service (aggregator, <site>.line): its own retained liveness.",
        f"pattern readwrite {r}/services/%u/status",
        "",
    ]
    return "\n".join(lines)


LINE_SUFFIX = ".line"  # a site's line service logs in as "<site>.line" (read-only: models)

#: Defaults sized for fedline's traffic: updates and models travel in chunks of at most
#: ``broker_bridge.chunking.DEFAULT_MAX_CHUNK`` (100 KiB), statuses and receipts are small.
DEFAULT_MAX_PACKET = 256 * 1024
DEFAULT_MAX_QUEUED_MESSAGES = 20_000
DEFAULT_MAX_QUEUED_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_AUTOSAVE_S = 60


def line_user(site: str) -> str:
    """The broker user of a site's line-inference service (its own, so client ids can be bound)."""
    return site + LINE_SUFFIX


def _is_loopback(addr: str) -> bool:
    import ipaddress

    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


@dataclass
class MosquittoConfig:
    """What :func:`write_broker_config` needs to know.

    The listener on ``port`` speaks TLS, always: with the operator's ``ca_file``,
    ``cert_file`` and ``key_file``, or with a CA and server certificate generated
    into ``<out>/pki`` (see :mod:`broker_bridge.pki`) for ``hosts``. A plaintext
    listener exists only when ``plain_port`` is given, and only on a loopback
    address (for tools on the broker's own host).

    ``bind_client_ids`` sets ``use_username_as_clientid`` on every listener: the
    broker replaces whatever client id a client sends by its username, so a site
    cannot take over (and disconnect) the aggregator's or another site's
    session. It follows that each connecting service has a user of its own: the
    edge agent logs in as ``<site>``, the line as ``<site>.line``.
    """

    federation: str
    sites: list[str]
    port: int = 8883
    bind: str = "127.0.0.1"
    plain_port: int | None = None
    plain_bind: str = "127.0.0.1"
    hosts: list[str] = field(default_factory=list)  # names in a generated certificate; default: bind + loopback
    prefix: str = "fedline"
    persistence: bool = True
    credentials_dir: str | None = None  # default <out>/credentials: the services' passwords (not the broker's)
    persistence_dir: str | None = None  # default <out>/data; e.g. /mosquitto/data in the Mosquitto image
    autosave_interval_s: int = DEFAULT_AUTOSAVE_S
    max_packet_size: int = DEFAULT_MAX_PACKET
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    sys_interval_s: int = 10  # how often the broker publishes its $SYS counters
    bind_client_ids: bool = True
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    require_client_cert: bool = False
    passwords: dict[str, str] = field(default_factory=dict)  # user -> password; generated when missing
    observer: bool = True
    log_file: str | None = None
    run_as_user: str | None = None  # mosquitto started as root drops to this user ('mosquitto' by default)
    intake_workers: int = 0  # users intake-0 ... for the aggregator's intake workers (0 or 1: none)
    bridge: BridgeConfig | None = None  # a plant broker's bridge to the central one (broker_bridge.bridge)

    def users(self) -> list[str]:
        """Every broker user: aggregator, observer, intake workers, per site the edge agent and the line,
        and a plant broker's uplink user."""
        return [
            AGGREGATOR_USER,
            *([OBSERVER_USER] if self.observer else []),
            *intake_users(self.intake_workers),
            *self.sites,
            *(line_user(s) for s in self.sites),
            *([self.bridge.site] if self.bridge else []),
        ]

    def validate(self) -> None:
        """Refuse a configuration that would weaken the broker, saying what to change (a ConfigError)."""
        from fedline.config import ConfigError

        if self.plain_port is not None and not _is_loopback(self.plain_bind):
            raise ConfigError(
                None,
                "plain_bind",
                f"a plaintext listener may only bind a loopback address, not "
                f"{self.plain_bind!r}: remote clients use the TLS listener",
            )
        if self.plain_port is not None and self.plain_port == self.port:
            raise ConfigError(None, "plain_port", f"the plaintext and TLS listeners cannot share port {self.port}")
        given = [f for f in (self.ca_file, self.cert_file, self.key_file) if f]
        if given and len(given) != 3:
            raise ConfigError(
                None, "ca_file", "give all of ca_file, cert_file and key_file, or none (then they are generated)"
            )
        for name in (
            "max_packet_size",
            "max_queued_messages",
            "max_queued_bytes",
            "max_connections",
            "autosave_interval_s",
            "sys_interval_s",
        ):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(None, name, f"must be a positive number, got {getattr(self, name)!r}")
        if self.max_packet_size < 16 * 1024:
            raise ConfigError(
                None,
                "max_packet_size",
                f"{self.max_packet_size} is below 16 KiB: fedline's chunks and manifests would not fit",
            )


def write_broker_config(cfg: MosquittoConfig, out_dir: str | Path) -> dict[str, Path]:
    """Write mosquitto.conf, acl, passwd, credentials/<user>.password (and pki/ if generated) into ``out_dir``.

    Returns the paths written. Existing passwords in ``cfg.passwords`` are
    kept; missing ones are generated (random, 24 bytes).
    """
    from broker_bridge.keys import write_private, write_public  # here: `fedline --help` stays light
    from broker_bridge.pki import TlsFiles, ensure_broker_tls

    cfg.validate()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    topics = Topics(cfg.federation, cfg.prefix)
    for s in cfg.sites:
        validate_site_id(s)
        if s in RESERVED_USERS:
            raise FedlineError(f"site id {s!r} is reserved for the broker's {s} user")
        if s.endswith(LINE_SUFFIX):
            raise FedlineError(f"site id {s!r} ends with {LINE_SUFFIX!r}, which names line users")
        if s.startswith(INTAKE_PREFIX):
            raise FedlineError(f"site id {s!r} starts with {INTAKE_PREFIX!r}, which names intake workers")
    if cfg.bridge is not None and cfg.bridge.site in [*cfg.sites, *RESERVED_USERS]:
        raise FedlineError(f"the bridge's plant site {cfg.bridge.site!r} is also a user of this broker")
    creds = Path(cfg.credentials_dir).resolve() if cfg.credentials_dir else out / "credentials"
    written: dict[str, Path] = {}
    hashes = []
    for user in cfg.users():
        pw = cfg.passwords.get(user) or secrets.token_urlsafe(24)
        cfg.passwords[user] = pw
        path = creds / f"{user}.password"
        write_private(path, pw + "\n")
        written[f"password:{user}"] = path
        hashes.append(f"{user}:{password_hash(pw)}")
    passwd = out / "passwd"
    write_private(passwd, "\n".join(hashes) + "\n")
    acl = out / "acl"
    acl_text = render_acl(
        topics,
        observer_user=OBSERVER_USER if cfg.observer else None,
        sites=cfg.sites,
        workers=intake_users(cfg.intake_workers),
    )
    write_public(acl, acl_text + (render_bridge_acl(cfg.bridge) if cfg.bridge else ""))
    data = Path(cfg.persistence_dir) if cfg.persistence_dir else out / "data"
    if not cfg.persistence_dir:
        data.mkdir(exist_ok=True)
    if cfg.ca_file:
        tls = TlsFiles(Path(cfg.ca_file), Path(cfg.cert_file or ""), Path(cfg.key_file or ""))
    else:
        hosts = cfg.hosts or [
            h for h in dict.fromkeys([cfg.bind, "127.0.0.1", "localhost"]) if h not in ("0.0.0.0", "::")
        ]
        tls = ensure_broker_tls(out / "pki", cfg.federation, hosts)
        written.update(ca=tls.ca_file, cert=tls.cert_file, key=tls.key_file)
    lines = [
        f"# Mosquitto 2 configuration for fedline federation {cfg.federation!r} (generated).",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {passwd}",
        f"acl_file {acl}",
        f"persistence {'true' if cfg.persistence else 'false'}",
        f"persistence_location {data}/",
        "# the whole store is rewritten at each save: often enough to lose little on a crash (the",
        "# edge outboxes resend what a crash loses), rarely enough not to rewrite a large store all the time",
        f"autosave_interval {cfg.autosave_interval_s}",
        "# limits: one packet is at most one chunk plus headers; an offline persistent client holds at",
        "# most max_queued_messages / max_queued_bytes (then the broker drops and counts; the outboxes resend)",
        f"max_packet_size {cfg.max_packet_size}",
        f"max_queued_messages {cfg.max_queued_messages}",
        f"max_queued_bytes {cfg.max_queued_bytes}",
        "max_inflight_messages 64",
        f"sys_interval {cfg.sys_interval_s}",
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

    def listener(port: int, bind: str) -> list[str]:
        return [
            "",
            f"listener {port} {bind}",
            "protocol mqtt",
            f"max_connections {cfg.max_connections}",
            f"use_username_as_clientid {'true' if cfg.bind_client_ids else 'false'}",
        ]

    lines += [
        *listener(cfg.port, cfg.bind),
        f"cafile {tls.ca_file}",
        f"certfile {tls.cert_file}",
        f"keyfile {tls.key_file}",
        f"require_certificate {'true' if cfg.require_client_cert else 'false'}",
    ]
    if cfg.plain_port is not None:
        lines += [
            "# plaintext, for tools on this host only (asked for with --plain-port)",
            *listener(cfg.plain_port, cfg.plain_bind),
        ]
    if cfg.bridge is not None:
        lines += render_bridge(cfg.bridge)
    conf = out / "mosquitto.conf"
    # with a bridge the file holds the plant's central password: private then
    (write_private if cfg.bridge is not None else write_public)(conf, "\n".join(lines) + "\n")
    written.update(conf=conf, acl=acl, passwd=passwd, data=data)
    return written


_HANDED_OUT: set[int] = set()  # every port free_port has returned in this process

#: where the kernel takes the local ports of outgoing connections (and of ``bind(port 0)``) when /proc does not say
_EPHEMERAL_DEFAULT = (32768, 60999)


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux's ``ip_local_port_range``; its default elsewhere)."""
    try:
        low, high = (int(v) for v in Path(path).read_text().split()[:2])
    except (OSError, ValueError):
        return _EPHEMERAL_DEFAULT
    return (low, high) if 1024 < low <= high else _EPHEMERAL_DEFAULT


def listener_ports(ephemeral: tuple[int, int] | None = None) -> range:
    """Where :func:`free_port` picks: the half below the ephemeral range (16384-32767 by Linux's default)."""
    low = (ephemeral or ephemeral_range())[0]
    return range(max(1024, low // 2), low)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free a moment ago (good enough for tests and the demo), never one this process was given.

    Why below the ephemeral range: a port the kernel hands to ``bind(port 0)`` is released again before the broker
    (or PLC simulator) binds it, and until then the kernel may give it to any outgoing connection on the machine:
    with tests opening hundreds of MQTT clients on two or three workers, mosquitto once failed to start with
    "Address already in use". Outgoing connections never take a port below the range, so only another process
    picking the same random port within that moment could, and the bind below refuses one in use.

    Why the memory: two calls made before either port is listened on (a broker's plain and TLS listeners, the
    demo's PLC ports) must not get the same number: seen as "the plaintext and TLS listeners cannot share port".
    """
    ports = listener_ports()
    for _ in range(1000):
        port = ports[secrets.randbelow(len(ports))]  # no shared seed: test workers draw independently
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:  # in use: another draw
                continue
        _HANDED_OUT.add(port)
        return port
    raise FedlineError(f"no free port below the ephemeral range found in 1,000 draws ({ports.start}-{ports.stop - 1})")


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def mosquitto_binary() -> str | None:
    """Path of the mosquitto broker binary, or None when it is not installed."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None
    )


class MosquittoProcess:
    """A private Mosquitto on loopback ports, for tests and the demo.

    It has the generated TLS listener (:attr:`tls_url`, trusting :attr:`ca_file`)
    and, because tests and the demo ask for it, a plaintext listener on
    127.0.0.1 (:attr:`url`). Client ids are not bound to usernames here by
    default (``bind_client_ids=False``), so one test can open several clients
    as one user; the demo and ``fedline broker config`` bind them. The store
    is saved every 5 s (tests kill the broker and expect what it queued).

    ``start()`` returns when the ports accept connections; ``stop()`` ends it
    gracefully (it saves its persistence file), ``kill()`` with SIGKILL, and
    ``restart()`` brings it back on the same ports with the same data.
    """

    def __init__(
        self,
        workdir: str | Path,
        federation: str = "test",
        sites: list[str] | None = None,
        port: int | None = None,
        tls_port: int | None = None,
        **config: object,
    ) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.tls_port = tls_port or free_port()
        config.setdefault("run_as_user", getpass.getuser())  # keep access to our own 0600 files
        config.setdefault("bind_client_ids", False)
        config.setdefault("autosave_interval_s", 5)
        self.config = MosquittoConfig(
            federation=federation,
            sites=list(sites or []),
            port=self.tls_port,
            plain_port=self.port,
            log_file=str(self.workdir / "mosquitto.log"),
            **config,  # type: ignore[arg-type]
        )
        self.paths = write_broker_config(self.config, self.workdir)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The plaintext loopback listener."""
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.tls_port}"

    @property
    def ca_file(self) -> str:
        """The CA certificate a client trusts to reach :attr:`tls_url`."""
        return str(self.config.ca_file or self.paths["ca"])

    def password(self, user: str) -> str:
        return self.config.passwords[user]

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        binary = mosquitto_binary()
        if binary is None:
            raise FedlineError("mosquitto is not installed (apt-get install mosquitto)")
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.paths["conf"])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise FedlineError(f"mosquitto exited with {self.proc.returncode}; see {self.workdir}/mosquitto.log")
            if all(_accepts(p) for p in (self.port, self.tls_port)):
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
