"""A plant broker's bridge to the central broker: only the plant's own topics of the central federation cross.

Why a bridge at all (the plant aggregator can also reach the central broker
as a client, which is what ``fedline plant`` does by default): where the
plant network lets one host out and no other, the plant broker makes the one
outbound TLS connection and the plant aggregator talks to its own broker
only. Either way the lines talk to the plant broker only, so a cut of the
plant-to-central link never reaches them (docs/architecture.md, "The plant tier").

What crosses, under ``<prefix>/<central federation>/``:

- out: ``sites/<plant>/update/#`` (the plant's sealed deltas) and ``sites/<plant>/status``;
- in: ``sites/<plant>/receipts``, ``sites/<plant>/fedkey`` and ``model/#`` (the central release).

The bridge logs in to the central broker as the plant's site user, whose
central ACL (the site patterns of :func:`broker_bridge.mosquitto.render_acl`)
already restricts it to exactly those topics: a compromised plant broker can
write only its own plant's update and status topics, and read only its
receipts, its key grant (sealed to the plant's key) and the encrypted model.
On the plant broker, the plant's uplink logs in as the same site id, with an
ACL of its own for the central topics (:func:`render_bridge_acl`). TLS is
required: the central broker's CA is pinned with ``bridge_cafile``.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker_bridge.errors import FedlineError
from broker_bridge.topics import Topics, validate_site_id


@dataclass
class BridgeConfig:
    """The bridge section of a plant broker's ``mosquitto.conf``."""

    site: str  # the plant's site id in the central federation (its user on both brokers)
    federation: str  # the central federation
    address: str  # host:port of the central broker's TLS listener
    ca_file: str  # the CA certificate of the central broker (pinned)
    password: str  # the plant site user's password on the central broker
    prefix: str = "fedline"
    protocol: str = "mqttv50"  # mqttv50 | mqttv311 (a central broker that speaks 3.1.1 only)
    keepalive_s: int = 30

    def validate(self) -> None:
        validate_site_id(self.site, "bridge site")
        validate_site_id(self.federation, "bridge federation")
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit():
            raise FedlineError(f"bridge address {self.address!r} must be host:port of the central TLS listener")
        if not self.ca_file:
            raise FedlineError("a bridge needs the central broker's CA certificate (bridge_cafile): TLS is required")
        if not self.password or any(c.isspace() for c in self.password):
            raise FedlineError("the bridge password must be non-empty, without whitespace (mosquitto.conf syntax)")
        if self.protocol not in ("mqttv50", "mqttv311"):
            raise FedlineError(f"bridge protocol {self.protocol!r} is not mqttv50 or mqttv311")

    def topics(self) -> list[tuple[str, str]]:
        """(pattern under the central root, direction) of everything that crosses."""
        s = f"sites/{self.site}"
        return [
            (f"{s}/update/#", "out"),
            (f"{s}/status", "out"),
            (f"{s}/receipts", "in"),
            (f"{s}/fedkey", "in"),
            ("model/#", "in"),
        ]


def render_bridge(b: BridgeConfig) -> list[str]:
    """The ``connection`` section (appended to the plant broker's mosquitto.conf, which is then private)."""
    b.validate()
    root = Topics(b.federation, b.prefix).root + "/"
    host, _, port = b.address.rpartition(":")
    lines = [
        "",
        f"# bridge to the central federation {b.federation!r}: only plant {b.site!r}'s own topics cross",
        f"connection fedline-{b.site}",
        f"address {host}:{port}",
        f"bridge_protocol_version {b.protocol}",
        f"bridge_cafile {b.ca_file}",
        "bridge_insecure false",
        "bridge_require_ocsp false",
        f"remote_username {b.site}",
        f"remote_password {b.password}",
        f"remote_clientid {b.site}",
        f"local_clientid fedline-bridge-{b.site}",
        "cleansession false",
        "try_private true",
        "notifications false",  # the central ACL would refuse $SYS/broker/connection/... anyway
        f"keepalive_interval {b.keepalive_s}",
        "restart_timeout 1 30",
        "start_type automatic",
    ]
    lines += [f"topic {pattern} {direction} 1 {root} {root}" for pattern, direction in b.topics()]
    return lines


def render_bridge_acl(b: BridgeConfig) -> str:
    """The plant broker's ACL block for the plant's uplink user (the central topics it may use there)."""
    root = Topics(b.federation, b.prefix).root
    s = f"{root}/sites/{b.site}"
    return "\n".join(
        [
            f"# the plant's uplink (user {b.site}) on the bridged central topics",
            f"user {b.site}",
            f"topic write {s}/update/#",
            f"topic readwrite {s}/status",
            f"topic read {s}/receipts",
            f"topic read {s}/fedkey",
            f"topic read {root}/model/#",
            "",
        ]
    )
