"""Sources of plant samples: Modbus TCP/RTU, serial lines, OPC UA, MQTT JSON and
Sparkplug B, CSV replay; and the mapping from samples to training rows.

Every source is used the same way::

    from firmware_adapters import build_source
    source = build_source(table, file="site.toml")     # one [[sources]] table
    async for sample in source:                        # firmware_adapters.sample.Sample
        ...
    source.stats                                       # reads, bad_reads, reconnects, gaps...

This package imports nothing heavy at import time (``fedline`` discovers its
CLI); each source's protocol library is imported when the source is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from firmware_adapters.sample import Sample, SourceStats

KIND_NAMES = ("modbus_tcp", "modbus_rtu", "serial", "opcua", "mqtt_json", "sparkplug", "csv")


def build_source(table: dict[str, Any], *, file: str | Path | None = None, where: str = "sources") -> Any:
    """Validate one ``[[sources]]`` table and return the source it describes.

    Raises :class:`fedline.config.ConfigError` naming ``file`` and the key for
    any configuration problem; connects to nothing (that happens on iteration).
    """
    from firmware_adapters import config

    cfg = config.parse_source(table, file=file, where=where)
    if isinstance(cfg, (config.ModbusTcpConfig, config.ModbusRtuConfig)):
        from firmware_adapters.modbus import ModbusSource

        return ModbusSource.from_config(cfg, file, where)
    if isinstance(cfg, config.SerialLineConfig):
        from firmware_adapters.serial_lines import SerialLineSource

        return SerialLineSource(cfg)
    if isinstance(cfg, config.OpcUaConfig):
        from firmware_adapters.opcua import OpcUaSource

        return OpcUaSource(cfg, file=file)
    if isinstance(cfg, config.MqttJsonConfig):
        from firmware_adapters.mqtt_json import MqttJsonSource

        return MqttJsonSource(cfg, file=file)
    if isinstance(cfg, config.SparkplugConfig):
        from firmware_adapters.sparkplug.source import SparkplugSource

        return SparkplugSource(cfg, file=file)
    from firmware_adapters.csv_replay import CsvSource

    return CsvSource(cfg, file=file, where=where)


def build_sources(tables: list[dict[str, Any]], *, file: str | Path | None = None) -> list[Any]:
    """All sources of a site file's ``sources`` array (``sources[i]`` in errors)."""
    return [build_source(t, file=file, where=f"sources[{i}]") for i, t in enumerate(tables)]


__all__ = ["KIND_NAMES", "Sample", "SourceStats", "build_source", "build_sources"]
