"""``plant.toml``: an aggregator file for the plant's own federation plus an ``[upstream]`` table.

Why one file: a plant tier is one process with two identities (the aggregator
of its lines' federation, and a site of the central federation); the operator
configures both in one place. Every table but ``[upstream]`` is read exactly
as ``aggregator.toml`` (:func:`aggregator.config.parse_config`); ``[upstream]``
names the plant's site key and the central enrollment, its outbox, and the
broker that reaches the central federation: the central broker itself, or the
plant broker when a Mosquitto bridge relays the plant's topics
(``fedline broker config --bridge-to``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.config import AggregatorConfig, parse_config
from broker_bridge.client import BrokerSettings
from broker_bridge.topics import validate_site_id
from edge.config import UpdateConfig
from fedline.config import ConfigError, load_toml, parse, resolve_path


@dataclass(frozen=True)
class UpstreamOutbox:
    """The plant's outbox towards the central aggregator (``edge.outbox``): bounds and resend timer."""

    max_bytes: int = 256 * 1024 * 1024
    max_count: int = 1000
    resend_after_s: float = 60.0  # sent but no receipt after this long: send again

    def validate(self) -> None:
        if self.max_bytes < 1024 or self.max_count < 1 or self.resend_after_s <= 0:
            raise ValueError("max_bytes must be >= 1024, max_count >= 1 and resend_after_s > 0")


@dataclass(frozen=True)
class UpstreamConfig:
    """The plant as a site of the central federation."""

    site: str  # this plant's site id in the central federation
    federation: str  # the central federation
    key_file: str  # the plant's site key in the central federation (``fedline keys``)
    enrollment_file: str  # the central enrollment (the central aggregator's public keys)
    data_dir: str = "upstream"  # outbox.sqlite (the plant's ledger towards central)
    topic_prefix: str = "fedline"
    status_interval_s: float = 30.0
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    outbox: UpstreamOutbox = field(default_factory=UpstreamOutbox)
    # [upstream.update] quantise = "int8": the plant's deltas cross the WAN at about 0.25x the bytes
    # (stochastic rounding of the lines' already-noised mean: post-processing, no line's epsilon changes)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    # mask the plant's deltas into the central federation's cohorts (plant.cohorts): the central
    # aggregator then reads only the sum over the cohort's plants, never one plant's delta
    secure_aggregation: bool = False

    def validate(self) -> None:
        validate_site_id(self.site, "upstream.site")
        validate_site_id(self.federation, "upstream.federation")
        if self.status_interval_s <= 0:
            raise ValueError("status_interval_s must be > 0")


@dataclass(frozen=True)
class PlantConfig:
    """The plant's aggregator (its lines' federation) and its upstream identity."""

    plant: AggregatorConfig
    upstream: UpstreamConfig
    file: str | None = None

    def data_dir(self) -> Path:
        return Path(self.upstream.data_dir)


def parse_plant_config(table: dict[str, Any], file: str | Path | None = None) -> PlantConfig:
    """Validate a parsed ``plant.toml``; relative paths are resolved against ``file``."""
    table = dict(table)
    up_table = table.pop("upstream", None)
    if up_table is None:
        raise ConfigError(file, "upstream", "missing: a plant needs [upstream] (its site id in the central federation)")
    if not isinstance(up_table, dict):
        raise ConfigError(file, "upstream", f"expected a table, got {up_table!r}")
    plant = parse_config(table, file)
    broker_table = up_table.pop("broker", None)
    if broker_table is None:
        raise ConfigError(file, "upstream.broker", "missing: the broker that reaches the central federation")
    up = parse(UpstreamConfig, up_table, file=file, where="upstream")
    broker = BrokerSettings.from_table(broker_table, file, "upstream.broker")
    if up.federation == plant.aggregator.federation and broker.url == plant.broker.url:
        raise ConfigError(
            file, "upstream.federation", "the central federation and the plant's are the same on the same broker"
        )
    if up.secure_aggregation and up.update.quantise != "off":
        raise ConfigError(
            file,
            "upstream.update.quantise",
            f"{up.update.quantise!r} cannot be combined with upstream.secure_aggregation = true: secure "
            "aggregation encodes each delta into its own 32-bit field and masks it there; remove "
            'upstream.update.quantise or set it to "off"',
        )
    up = dataclasses.replace(
        up,
        key_file=str(resolve_path(file, up.key_file)),
        enrollment_file=str(resolve_path(file, up.enrollment_file)),
        data_dir=str(resolve_path(file, up.data_dir)),
        broker=broker,
    )
    return PlantConfig(plant, up, str(file) if file is not None else None)


def load_plant_config(path: str | Path) -> PlantConfig:
    """Read and validate ``plant.toml``."""
    return parse_plant_config(load_toml(path), path)
