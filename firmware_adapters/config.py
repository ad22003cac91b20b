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
from dataclasses import dataclass, field
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
                "or set security_mode = \"None\" to connect without signing or encryption")


@dataclass(frozen=True, kw_only=True)
class _MqttCommon(_Common):
    url: str = "mqtt://127.0.0.1:1883"
    client_id: str = ""
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    keepalive_s: int = 30


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
    kind: Literal["sparkplug"]
    group_id: str = "+"  # a group id, or + for every group
    edge_node_id: str = "+"  # an edge node id, or + for every node
    request_rebirth: bool = True
    rebirth_min_interval_s: float = 5.0


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
    "poll_interval_s": ("gt", 0), "timeout_s": ("gt", 0), "reconnect_initial_s": ("gt", 0),
    "reconnect_max_s": ("gt", 0), "rate_hz": ("ge", 0), "sampling_interval_ms": ("ge", 0),
    "publishing_interval_ms": ("gt", 0), "rebirth_min_interval_s": ("ge", 0), "keepalive_s": ("gt", 0),
    "max_line_bytes": ("gt", 0), "retries": ("ge", 0), "baudrate": ("gt", 0), "max_gap": ("ge", 0),
}


def _check_numbers(cfg: Any, file: str | Path | None, prefix: str) -> None:
    """Finite, in-range numbers, reported against their own key (NaN in TOML is legal)."""
    for key, (op, bound) in _BOUNDS.items():
        value = getattr(cfg, key, None)
        if value is None:
            continue
        if not math.isfinite(value) or (value <= bound if op == "gt" else value < bound):
            raise ConfigError(file, prefix + key, f"expected a number {'>' if op == 'gt' else '>='} {bound:g}, got {value!r}")
    for group, value in (getattr(cfg, "group_intervals_s", None) or {}).items():
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(file, f"{prefix}group_intervals_s.{group}", f"expected a number > 0, got {value!r}")
    if isinstance(cfg, ModbusTcpConfig) and not 1 <= cfg.port <= 65535:
        raise ConfigError(file, prefix + "port", f"expected a TCP port 1..65535, got {cfg.port}")
    if isinstance(cfg, OpcUaConfig) and not cfg.url.startswith("opc.tcp://"):
        raise ConfigError(file, prefix + "url", f"expected opc.tcp://host:port/path, got {cfg.url!r}")
    if isinstance(cfg, _MqttCommon):
        from broker_bridge.client import BrokerSettings

        try:
            BrokerSettings(url=cfg.url).validate()
        except ValueError as exc:
            raise ConfigError(file, prefix + "url", str(exc)) from None


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
    cfg = parse(KINDS[kind], table, file=file, where=where)
    _check_numbers(cfg, file, prefix)
    return cfg


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
