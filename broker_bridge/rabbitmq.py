"""RabbitMQ (3.10+, MQTT plugin) as a federation's broker: users, permissions, and a private cluster.

A plant that runs its central broker as a cluster (RabbitMQ, EMQX, HiveMQ,
VerneMQ) needs the same confinement that Mosquitto's ACL gives: a site writes
only under its own ``sites/<site>/`` and reads only the model and its own
receipts. RabbitMQ says it with *topic permissions*: per user, one write and
one read regular expression over AMQP routing keys on ``amq.topic``, where
the MQTT plugin maps ``/`` to ``.`` (and ``.`` inside a level to ``/``), and a
subscription is checked by its binding key (``+`` becomes ``*``, ``#`` stays).

The rules are not written twice: :func:`topic_permissions` parses the
Mosquitto ACL that :func:`broker_bridge.mosquitto.render_acl` generates and
translates each line, so a topic added to the ACL reaches RabbitMQ too.

What RabbitMQ 3.10 does differently, and what fedline does about it:

- MQTT 3.1.1 only: every fedline client takes ``protocol = "3.1.1"``.
- The retained store is per node: a site on another node than the
  aggregator's never sees a retained manifest. The aggregator answers a
  request for the current state (see docs/architecture.md), so retained
  messages are an optimisation, not a dependency.
- AMQP 0-9-1 is not listened on (``listeners.tcp = none``): users may only
  speak MQTT, so their resource permissions cannot be used to touch other
  users' queues directly.

:class:`RabbitCluster` starts private nodes on loopback ports for the tests
(Debian's ``rabbitmq-server``), joins them into one cluster and creates the
federation's users.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from broker_bridge.errors import FedlineError
from broker_bridge.keys import write_private
from broker_bridge.mosquitto import AGGREGATOR_USER, OBSERVER_USER, RESERVED_USERS, free_port, render_acl
from broker_bridge.topics import Topics, validate_site_id

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
EXCHANGE = "amq.topic"
# What the MQTT plugin itself needs on resources: its per-client queues and the topic exchange.
RESOURCE_REGEX = r"^(mqtt-subscription-.*|mqtt-will-.*|amq\.topic)$"
HASHING = "rabbit_password_hashing_sha256"  # RabbitMQ's default since 3.6


def password_hash(password: str, salt: bytes | None = None) -> str:
    """``password`` as RabbitMQ stores it under :data:`HASHING`: base64 of a 4-byte salt and SHA-256(salt + password)."""
    salt = secrets.token_bytes(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


@dataclass(frozen=True)
class AclRule:
    """One line of a Mosquitto ACL: ``user`` (a name) or ``pattern`` (``%u`` = every username)."""

    user: str | None  # None: a pattern line, for every site
    access: str  # read | write | readwrite
    topic_filter: str


def parse_acl(text: str) -> list[AclRule]:
    """The rules of an ACL that :func:`render_acl` wrote (``user``, ``topic`` and ``pattern`` lines)."""
    rules: list[AclRule] = []
    user: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        if words[0] == "user" and len(words) == 2:
            user = words[1]
        elif words[0] in ("topic", "pattern") and len(words) == 3 and words[1] in ("read", "write", "readwrite"):
            if words[0] == "topic" and user is None:
                raise FedlineError(f"ACL line {line!r} grants anonymous clients a topic")
            rules.append(AclRule(user if words[0] == "topic" else None, words[1], words[2]))
        else:
            raise FedlineError(f"ACL line {line!r} is not one fedline writes")
    return rules


def filter_regex(topic_filter: str, username: str) -> str:
    """A regular expression over routing keys (and binding keys) equivalent to an MQTT topic filter.

    ``%u`` becomes the username; ``+`` one level (which also matches a
    subscriber's ``*``); a trailing ``#`` the parent level and anything below it.
    """
    levels = topic_filter.replace("%u", username).split("/")
    out: list[str] = []
    for i, level in enumerate(levels):
        if level == "#":
            if i != len(levels) - 1:
                raise FedlineError(f"topic filter {topic_filter!r}: '#' must be the last level")
            return "^" + r"\.".join(out) + r"(\..*)?$" if out else "^.*$"
        out.append(r"[^.]+" if level == "+" else re.escape(level.replace(".", "/")))
    return "^" + r"\.".join(out) + "$"


def _either(regexes: list[str]) -> str:
    """One regex matching any of ``regexes``; one that matches nothing when there are none."""
    if not regexes:
        return "^$"  # routing keys are never empty: grants nothing
    return "|".join(f"(?:{r})" for r in regexes)


def topic_permissions(
    topics: Topics, sites: list[str], observer: bool = True, workers: list[str] | None = None
) -> dict[str, tuple[str, str]]:
    """``user -> (write regex, read regex)`` on ``amq.topic``, from the federation's Mosquitto ACL."""
    acl = render_acl(topics, observer_user=OBSERVER_USER if observer else None, sites=sites, workers=workers)
    rules = parse_acl(acl)
    users = [AGGREGATOR_USER, *([OBSERVER_USER] if observer else []), *(workers or []), *sites]
    perms: dict[str, tuple[str, str]] = {}
    for user in users:
        # as in Mosquitto, a pattern line applies to every user (%u is that user's name)
        mine = [r for r in rules if r.user == user or r.user is None]
        write = [filter_regex(r.topic_filter, user) for r in mine if r.access in ("write", "readwrite")]
        read = [filter_regex(r.topic_filter, user) for r in mine if r.access in ("read", "readwrite")]
        perms[user] = (_either(write), _either(read))
    return perms


def rabbitmq_available() -> bool:
    """Whether Debian's rabbitmq-server is installed (``apt-get install rabbitmq-server``)."""
    return (RABBIT_BIN / "rabbitmq-server").exists() and shutil.which("erl") is not None


@dataclass
class RabbitNode:
    """One node of a private cluster."""

    name: str  # Erlang node name, e.g. fl1a2b3c@localhost
    mqtt_port: int
    dist_port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"


@dataclass
class RabbitCluster:
    """A private RabbitMQ cluster of ``nodes`` nodes on loopback, with the MQTT plugin and fedline's users.

    Each node has its own MQTT port; they share users, permissions and
    routing (a message published on one reaches subscribers on the others),
    but not retained messages. ``start()`` returns when every node runs and
    belongs to the cluster.
    """

    workdir: Path
    federation: str = "test"
    sites: list[str] = field(default_factory=list)
    nodes: int = 2
    prefix: str = "fedline"
    passwords: dict[str, str] = field(default_factory=dict)
    members: list[RabbitNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        for s in self.sites:
            validate_site_id(s)
            if s in RESERVED_USERS:
                raise FedlineError(f"site id {s!r} is reserved for the broker's {s} user")
        self._cookie = secrets.token_hex(16)
        tag = secrets.token_hex(3)
        self.members = [
            RabbitNode(f"fl{tag}n{i}@localhost", free_port(), free_port(), self.workdir / f"node{i}")
            for i in range(self.nodes)
        ]

    # -- control -------------------------------------------------------------
    def _env(self, node: RabbitNode) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": str(self.workdir),  # the Erlang cookie file lives here
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_MNESIA_BASE": str(node.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.workdir / "log"),
            "RABBITMQ_CONFIG_FILE": str(node.workdir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(node.workdir / "pid"),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": f"-setcookie {self._cookie}",
        }

    def ctl(self, node: RabbitNode, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl`` against ``node``; raise naming the command and its output on failure."""
        cmd = [str(RABBIT_BIN / "rabbitmqctl"), "--erlang-cookie", self._cookie, "-n", node.name, *args]
        res = subprocess.run(cmd, env=self._env(node), capture_output=True, text=True, timeout=timeout, check=False)
        if res.returncode != 0:
            raise FedlineError(
                f"rabbitmqctl {' '.join(args)} on {node.name} failed ({res.returncode}): "
                f"{(res.stderr or res.stdout).strip()[-400:]}"
            )
        return res.stdout

    def start(self, timeout: float = 120.0) -> RabbitCluster:
        if not rabbitmq_available():
            raise FedlineError("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        for node in self.members:
            node.workdir.mkdir(parents=True, exist_ok=True)
            (node.workdir / "rabbitmq.conf").write_text(
                "\n".join(
                    [
                        "listeners.tcp = none",  # MQTT only: no AMQP 0-9-1 listener
                        f"mqtt.listeners.tcp.default = 127.0.0.1:{node.mqtt_port}",
                        "mqtt.allow_anonymous = false",
                        "loopback_users = none",
                        "log.console = false",
                        "",
                    ]
                )
            )
            log = (node.workdir / "server.log").open("wb")
            node.proc = subprocess.Popen(
                [str(RABBIT_BIN / "rabbitmq-server")],
                env=self._env(node),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
        try:
            for node in self.members:
                # waits for the pid file, then for the node to have booted (await_startup alone fails
                # while the node has not yet registered with epmd)
                self.ctl(node, "wait", "--timeout", str(int(timeout)), str(node.workdir / "pid"), timeout=timeout + 10)
            first = self.members[0]
            for node in self.members[1:]:
                self.ctl(node, "stop_app")
                self.ctl(node, "join_cluster", first.name)
                self.ctl(node, "start_app")
            self._wait_mqtt(timeout)
            self._create_users(first)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_mqtt(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for node in self.members:
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", node.mqtt_port), 0.2):
                    break
                if time.monotonic() > deadline:
                    raise FedlineError(
                        f"{node.name} does not listen for MQTT on {node.mqtt_port}; see {node.workdir}/server.log"
                    )
                time.sleep(0.1)

    def _create_users(self, node: RabbitNode) -> None:
        """Every user, its resource permissions and its topic permissions, in one ``import_definitions``.

        Why one file and not ``add_user`` / ``set_permissions`` / ``set_topic_permissions`` per user: each
        ``rabbitmqctl`` call boots an Erlang VM (1-2 s on a loaded 2-core machine), and fifteen of them were
        most of the cluster's start. The definitions are RabbitMQ's own export format; the file is 0600.
        """
        topics = Topics(self.federation, self.prefix)
        users, perms, topic_perms = [], [], []
        for user, (write, read) in topic_permissions(topics, self.sites).items():
            # hex: also safe on a rabbitmqctl command line, where a password starting with "-" reads as an option
            pw = self.passwords.setdefault(user, secrets.token_hex(18))
            users.append({"name": user, "password_hash": password_hash(pw), "hashing_algorithm": HASHING, "tags": []})
            perms.append(
                {
                    "user": user,
                    "vhost": "/",
                    "configure": RESOURCE_REGEX,
                    "write": RESOURCE_REGEX,
                    "read": RESOURCE_REGEX,
                }
            )
            topic_perms.append({"user": user, "vhost": "/", "exchange": EXCHANGE, "write": write, "read": read})
        path = self.workdir / "definitions.json"
        doc = {"users": users, "vhosts": [{"name": "/"}], "permissions": perms, "topic_permissions": topic_perms}
        write_private(path, json.dumps(doc))
        self.ctl(node, "import_definitions", str(path))

    def password(self, user: str) -> str:
        return self.passwords[user]

    def password_file(self, user: str) -> Path:
        """A 0600 file holding ``user``'s password (what a ``[broker] password_file`` names)."""
        path = self.workdir / "credentials" / f"{user}.password"
        if not path.exists():
            write_private(path, self.passwords[user] + "\n")
        return path

    def running_nodes(self) -> list[str]:
        """The node names the first node counts as running members of its cluster."""
        out = self.ctl(self.members[0], "cluster_status", "--formatter", "json")
        return sorted(json.loads(out).get("running_nodes", []))

    def stop(self) -> None:
        for node in self.members:
            if node.proc is not None and node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGTERM)
                try:
                    node.proc.wait(20)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(node.proc.pid, signal.SIGKILL)
                    node.proc.wait()
            node.proc = None

    def __enter__(self) -> RabbitCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
