"""Source configuration: one TOML table per source, parsed into frozen dataclasses.

In a site file::

    [[sources]]
    kind = "modbus_tcp"          # modbus_tcp | modbus_rtu | serial | opcua | mqtt_json | sparkplug | csv
    name = "press-1"
    host = "10.0.0.17"
    map = "maps/press.toml"      # relative to this file; or inline [[sources.tags]]
    poll_interval_s = 0.5

:func:`firmware_adapters.build_source` turns such a table into a source. Unknown
keys, wrong types and missing required keys (an address, a host...) raise
:class:`fedline.config.ConfigError` naming the file and the dotted key, at
start-up, before any connection is tried.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from fedline.config import ConfigError, parse, resolve_path
from firmware_adapters.registers import Order, RegisterMap, TagSpec, load_register_map


@dataclass(frozen=True, kw_only=True)
class _Common:
    kind: str
    name: str = ""
    reconnect_initial_s: float = 0.2
    reconnect_max_s: float = 30.0

    @property
    def source_name(self) -> str:
        return self.name or self.kind


@dataclass(frozen=True, kw_only=True)
class _ModbusCommon(_Common):
    device_id: int = 1
    timeout_s: float = 1.0
    retries: int = 1
    poll_interval_s: float = 1.0
    group_intervals_s: dict[str, float] = field(default_factory=dict)
    map: str | None = None
    # inline tags; not Optional so that fedline.config reports the inner key (tags[3].address)
    tags: list[TagSpec] = field(default_factory=list)
    word_order: Order = "big"
    byte_order: Order = "big"
    row_counter: str | None = None
    max_gap: int = 0

    def validate(self) -> None:
        if (self.map is None) == (not self.tags):
            raise ValueError("give exactly one of `map` (a register map file) or inline [[tags]]")
        if not 0 <= self.device_id <= 247:
            raise ValueError("device_id must be in 0..247")


@dataclass(frozen=True, kw_only=True)
class ModbusTcpConfig(_ModbusCommon):
    kind: Literal["modbus_tcp"]
    host: str
    port: int = 502


@dataclass(frozen=True, kw_only=True)
class ModbusRtuConfig(_ModbusCommon):
    kind: Literal["modbus_rtu"]
    port: str  # a device path (/dev/ttyUSB0) or a pyserial URL
    baudrate: int = 19200
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1


@dataclass(frozen=True, kw_only=True)
class SerialLineConfig(_Common):
    kind: Literal["serial"]
    port: str
    protocol: Literal["csv", "jsonl", "kv"]
    baudrate: int = 9600
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    columns: list[str] | None = None  # csv: names of the fields, in order
    header: bool = False  # csv: the first line names the columns
    delimiter: str = ","  # csv
    pair_separator: str = "="  # kv: `temp=21.5 rpm=1500`
    encoding: str = "utf-8"
    max_line_bytes: int = 4096
    ts_key: str | None = None  # a field carrying the device timestamp (Unix seconds)

    def validate(self) -> None:
        if self.protocol == "csv" and not self.columns and not self.header:
            raise ValueError("protocol = 'csv' needs `columns` or `header = true`")


@dataclass(frozen=True)
class OpcUaNode:
    tag: str
    node_id: str | None = None  # "ns=2;s=Line1.Temperature"
    browse_path: str | None = None  # "0:Objects/2:Line1/2:Temperature"

    def validate(self) -> None:
        if (self.node_id is None) == (self.browse_path is None):
            raise ValueError(f"node {self.tag!r}: give exactly one of node_id or browse_path")


@dataclass(frozen=True, kw_only=True)
class OpcUaConfig(_Common):
    kind: Literal["opcua"]
    url: str
    nodes: list[OpcUaNode]
    sampling_interval_ms: float = 100.0
    publishing_interval_ms: float = 100.0
    # secure by default: "None" only when the table asks for it (see firmware_adapters/opcua_cert.py)
    security_mode: Literal["None", "Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    security_policy: Literal["Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss"] = "Basic256Sha256"
    certificate: str | None = None
    private_key: str | None = None
    server_certificate: str | None = None
    username: str | None = None
    password: str | None = None
    timeout_s: float = 4.0

    def validate(self) -> None:
        if not self.nodes:
            raise ValueError("`nodes` must list at least one node")
        if self.security_mode != "None" and not (self.certificate and self.private_key):
            raise ValueError(
                f"security_mode = {self.security_mode!r} (the default) needs `certificate` and `private_key`: "
                "make them with `fedline opcua-cert --out DIR` and have the server trust the certificate, "
                'or set security_mode = "None" to connect without signing or encryption'
            )


#: keys of an MQTT source table that are broker settings (``broker_bridge.client.BrokerSettings``);
#: the session keys are not among them because a telemetry reader always uses a clean session
BROKER_KEYS = (
    "url",
    "client_id",
    "username",
    "password",
    "password_file",
    "protocol",
    "ca_file",
    "cert_file",
    "key_file",
    "tls_insecure",
    "keepalive_s",
)


@dataclass(frozen=True, kw_only=True)
class _MqttCommon(_Common):
    """The broker keys (:data:`BROKER_KEYS`) sit in the source table itself and are parsed by
    ``BrokerSettings.from_table`` into :attr:`broker` (paths relative to the site file)."""

    broker: Any = None  # BrokerSettings, set by parse_source (never written in the table)


@dataclass(frozen=True, kw_only=True)
class MqttJsonConfig(_MqttCommon):
    kind: Literal["mqtt_json"]
    topics: list[str]
    qos: Literal[0, 1, 2] = 1
    ts_key: str | None = None
    flatten_separator: str = "."
    tag_prefix_topic: bool = False  # prefix each tag with the message's topic

    def validate(self) -> None:
        if not self.topics:
            raise ValueError("`topics` must list at least one topic filter")


@dataclass(frozen=True, kw_only=True)
class SparkplugConfig(_MqttCommon):
    """``host_id`` set: a Sparkplug Host Application (STATE birth and will; may ask for rebirths).
    Unset: a passive observer that publishes nothing, ever (see firmware_adapters/sparkplug/source.py)."""

    kind: Literal["sparkplug"]
    group_id: str = "+"  # a group id, or + for every group
    edge_node_id: str = "+"  # an edge node id, or + for every node
    host_id: str | None = None
    # None: on for a host application reading one group and node, off for wildcards and passive observers
    request_rebirth: bool | None = None
    rebirth_min_interval_s: float = 5.0

    def validate(self) -> None:
        for key in ("group_id", "edge_node_id"):
            value = getattr(self, key)
            if not value or "/" in value or "#" in value or ("+" in value and value != "+"):
                raise ValueError(f"{key} {value!r} must be one topic level: an id, or + for all")
        if self.host_id is not None and (not self.host_id or any(c in self.host_id for c in "/+#")):
            raise ValueError(f"host_id {self.host_id!r} must be a non-empty id without /, + or #")
        if self.request_rebirth and self.host_id is None:
            raise ValueError(
                "request_rebirth = true needs host_id: a passive observer never sends NCMD "
                "(set host_id to run as a Sparkplug Host Application)"
            )

    @property
    def rebirth(self) -> bool:
        """Whether this reader sends rebirth requests (NCMD), after the defaults above."""
        if self.request_rebirth is not None:
            return self.request_rebirth
        return self.host_id is not None and "+" not in (self.group_id, self.edge_node_id)


@dataclass(frozen=True, kw_only=True)
class CsvConfig(_Common):
    kind: Literal["csv"]
    path: str
    rate_hz: float = 0.0  # 0: as fast as the consumer takes them
    columns: list[str] | None = None  # default: every column that holds numbers
    loop: bool = False
    filter: dict[str, str] = field(default_factory=dict)  # keep rows where column == value
    ts_column: str | None = None


KINDS: dict[str, type] = {
    "modbus_tcp": ModbusTcpConfig,
    "modbus_rtu": ModbusRtuConfig,
    "serial": SerialLineConfig,
    "opcua": OpcUaConfig,
    "mqtt_json": MqttJsonConfig,
    "sparkplug": SparkplugConfig,
    "csv": CsvConfig,
}


#: numeric keys and the least value each may take (strictly greater for "gt")
_BOUNDS: dict[str, tuple[str, float]] = {
    "poll_interval_s": ("gt", 0),
    "timeout_s": ("gt", 0),
    "reconnect_initial_s": ("gt", 0),
    "reconnect_max_s": ("gt", 0),
    "rate_hz": ("ge", 0),
    "sampling_interval_ms": ("ge", 0),
    "publishing_interval_ms": ("gt", 0),
    "rebirth_min_interval_s": ("ge", 0),
    "max_line_bytes": ("gt", 0),
    "retries": ("ge", 0),
    "baudrate": ("gt", 0),
    "max_gap": ("ge", 0),
}


def _check_numbers(cfg: Any, file: str | Path | None, prefix: str) -> None:
    """Finite, in-range numbers, reported against their own key (NaN in TOML is legal)."""
    for key, (op, bound) in _BOUNDS.items():
        value = getattr(cfg, key, None)
        if value is None:
            continue
        if not math.isfinite(value) or (value <= bound if op == "gt" else value < bound):
            raise ConfigError(
                file, prefix + key, f"expected a number {'>' if op == 'gt' else '>='} {bound:g}, got {value!r}"
            )
    for group, value in (getattr(cfg, "group_intervals_s", None) or {}).items():
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(file, f"{prefix}group_intervals_s.{group}", f"expected a number > 0, got {value!r}")
    if isinstance(cfg, ModbusTcpConfig) and not 1 <= cfg.port <= 65535:
        raise ConfigError(file, prefix + "port", f"expected a TCP port 1..65535, got {cfg.port}")
    if isinstance(cfg, OpcUaConfig) and not cfg.url.startswith("opc.tcp://"):
        raise ConfigError(file, prefix + "url", f"expected opc.tcp://host:port/path, got {cfg.url!r}")


def parse_source(table: dict[str, Any], *, file: str | Path | None = None, where: str = "sources") -> Any:
    """Parse one ``[[sources]]`` table into the dataclass for its ``kind``."""
    if not isinstance(table, dict):
        raise ConfigError(file, where, f"expected a table, got {table!r}")
    prefix = f"{where}." if where else ""
    kind = table.get("kind")
    if kind is None:
        raise ConfigError(file, prefix + "kind", f"missing; expected one of {', '.join(KINDS)}")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ConfigError(file, prefix + "kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")
    cls = KINDS[kind]
    if issubclass(cls, _MqttCommon):
        return _parse_mqtt_source(cls, table, file, where)
    cfg = parse(cls, table, file=file, where=where)
    _check_numbers(cfg, file, prefix)
    return cfg


def _parse_mqtt_source(cls: type, table: dict[str, Any], file: str | Path | None, where: str) -> Any:
    """An MQTT source: its own keys by ``cls``, the broker keys by ``BrokerSettings.from_table``."""
    from broker_bridge.client import BrokerSettings

    prefix = f"{where}." if where else ""
    if "broker" in table:
        raise ConfigError(
            file, prefix + "broker", f"write the broker keys ({', '.join(BROKER_KEYS)}) in the source table itself"
        )
    own = {k: v for k, v in table.items() if k not in BROKER_KEYS}
    cfg: Any = parse(cls, own, file=file, where=where)
    _check_numbers(cfg, file, prefix)
    broker = BrokerSettings.from_table(
        {k: v for k, v in table.items() if k in BROKER_KEYS},
        file,
        where,
        backoff_min_s=cfg.reconnect_initial_s,
        backoff_max_s=max(cfg.reconnect_max_s, cfg.reconnect_initial_s),
    )
    return replace(cfg, broker=broker)


def register_map_of(cfg: _ModbusCommon, file: str | Path | None, where: str = "sources") -> RegisterMap:
    """The register map of a Modbus source: its map file, or its inline tags."""
    if cfg.map is not None:
        path = resolve_path(file, cfg.map)
        try:
            return load_register_map(path)
        except (OSError, UnicodeDecodeError) as exc:  # a directory, a binary file, no permission
            raise ConfigError(file, f"{where}.map", f"cannot read register map {path}: {exc}") from None
    regmap_table: dict[str, Any] = {"word_order": cfg.word_order, "byte_order": cfg.byte_order}
    if cfg.row_counter is not None:
        regmap_table["row_counter"] = cfg.row_counter
    regmap = RegisterMap(tags=list(cfg.tags), **regmap_table)
    try:
        regmap.validate()
    except ValueError as exc:
        raise ConfigError(file, f"{where}.tags", str(exc)) from None
    return regmap
