"""``line.toml``: the configuration of one line-inference process.

Example::

    [line]
    site = "press-3"
    federation = "plant-a"
    model_source = "manifest"            # or "model_dir" (the site's personalised ONNX)
    enrollment = "keys/enrollment.json"  # the aggregator's public key, to verify manifests
    # aggregator_key = "keys/aggregator.pub"   # or a public-key file
    # model_dir = "models/press-3"
    state_dir = "state/infer-press-3"    # model in service + previous one (rollback, restart)
    batch_max = 64
    poll_s = 1.0                         # model_dir and rollback-request polling
    # command_topic = "plant/press-3/infer/command"   # on the output broker: "rollback"

    [line.canary]                        # on wherever [rows] has a label: keep the old model if the new one is worse here
    rows = 256                           # recent labelled rows kept
    min_rows = 32                        # fewer than this: no canary (logged)
    margin = 0.02                        # log loss (classification) or MSE (regression)

    [line.adopt]                         # manifest mode: refuse a version that moved too far
    max_step_relative = 10.0             # x the served model's L2 norm, per version (0: off)
    max_step_l2 = 0.0                    # absolute L2 per version (0: off)

    [[sources]]                          # firmware_adapters.build_source tables
    kind = "csv"
    path = "data/ai4i2020.csv"

    [rows]                               # firmware_adapters.rows.RowMapping, same as training
    features = [{ tag = "Torque [Nm]", range = [0, 80] }]

    [broker]                             # the federation broker (manifest); BrokerSettings
    url = "mqtt://127.0.0.1:1883"
    username = "press-3"
    password_file = "keys/press-3.password"

    [output]
    file = "predictions.jsonl"           # JSON lines, one per prediction
    topic = "plant/press-3/predictions"  # and/or MQTT
    threshold = 0.5                      # alarm when score >= threshold
    # broker = { url = "mqtt://plant-broker:1883" }   # default: [broker]

    [metrics]
    port = 19312                         # Prometheus /metrics (no port: off; 0: any free port)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from fedline.config import ConfigError, load_toml, parse, resolve_path
from fedline.metrics import MetricsConfig
from models.step_bound import StepBound


@dataclass(frozen=True)
class CanaryConfig:
    """Keep the model in service when a new one is worse on the line's recent labelled rows.

    On by default wherever the rows carry a label (``[rows] label``): a new version is scored on the
    last ``rows`` labelled rows next to the model in service and refused (reason ``canary``) when its
    loss is worse by more than ``margin``; with fewer than ``min_rows`` labelled rows yet it is taken
    (logged ``canary.skipped``). Without a label there is nothing to check against (logged
    ``canary.off`` at start). ``enabled = false`` turns it off everywhere.
    """

    enabled: bool = True
    rows: int = 256
    min_rows: int = 32
    margin: float = 0.02

    def validate(self) -> None:
        if self.rows < 1 or self.min_rows < 1 or self.min_rows > self.rows:
            raise ValueError("canary needs 1 <= min_rows <= rows")
        if self.margin < 0:
            raise ValueError("canary margin must be >= 0")


@dataclass(frozen=True)
class LineConfig:
    site: str
    federation: str
    state_dir: str
    model_source: Literal["manifest", "model_dir"] = "manifest"
    model_dir: str | None = None
    enrollment: str | None = None
    aggregator_key: str | None = None
    # the site's private key file: opens the federation content key granted to the site (manifest mode) and
    # checks commands the site signed; a line is part of its site
    site_key: str | None = None
    topic_prefix: str = "fedline"
    batch_max: int = 64
    queue_max: int = 4096
    poll_s: float = 1.0
    threads: int = 1
    max_model_bytes: int = 256 * 1024 * 1024
    command_topic: str | None = None
    canary: CanaryConfig = field(default_factory=CanaryConfig)
    # manifest mode: how far a new global version may move from the one in service (models.step_bound,
    # measured on the tensors inside the ONNX: edge.inference.onnx_params); the same keys as the site's [adopt]
    adopt: StepBound = field(default_factory=StepBound)

    def validate(self) -> None:
        from broker_bridge.topics import validate_site_id

        try:
            validate_site_id(self.site)
            validate_site_id(self.federation, "federation")
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        if self.model_source == "model_dir" and not self.model_dir:
            raise ValueError("model_source = 'model_dir' needs model_dir")
        if self.model_source == "manifest" and not (self.enrollment or self.aggregator_key):
            raise ValueError(
                "model_source = 'manifest' needs enrollment or aggregator_key "
                "(the aggregator's public key, to check manifest signatures)"
            )
        if self.model_source == "manifest" and not self.site_key:
            raise ValueError(
                "model_source = 'manifest' needs site_key (the site's private key file: the "
                "models are encrypted to the federation's members)"
            )
        if self.command_topic and not (self.site_key or self.enrollment or self.aggregator_key):
            raise ValueError(
                "command_topic needs site_key, enrollment or aggregator_key (commands are signed "
                "by the site or the aggregator)"
            )
        if self.batch_max < 1 or self.queue_max < self.batch_max:
            raise ValueError("need 1 <= batch_max <= queue_max")
        if self.poll_s <= 0 or self.threads < 1:
            raise ValueError("poll_s must be > 0 and threads >= 1")


@dataclass(frozen=True)
class OutputConfig:
    file: str | None = None
    topic: str | None = None
    alarm_topic: str | None = None
    threshold: float | None = None
    qos: Literal[0, 1] = 0
    queue_max: int = 10000  # predictions waiting for the MQTT broker; oldest dropped (counted) beyond
    # the wait happens on disk (<state_dir>/mqtt-spool.sqlite), also bounded by bytes; spool = false keeps
    # it in memory (lost on a restart)
    spool: bool = True
    spool_max_mb: float = 64.0
    broker: dict[str, Any] | None = None
    # the file rotates past this size (a line PC's disk is small and the line never stops): file.1 is the
    # newest old one, up to file_keep of them; 0 = never rotate
    file_max_mb: float = 100.0
    file_keep: int = 5

    def validate(self) -> None:
        if self.queue_max < 1 or self.spool_max_mb <= 0:
            raise ValueError(f"need queue_max >= 1 and spool_max_mb > 0, got {self.queue_max} and {self.spool_max_mb}")
        if self.file_max_mb < 0 or self.file_keep < 1:
            raise ValueError(f"need file_max_mb >= 0 and file_keep >= 1, got {self.file_max_mb} and {self.file_keep}")
        for name in ("topic", "alarm_topic"):
            t = getattr(self, name)
            if t is not None and (not t or "+" in t or "#" in t):
                raise ValueError(f"{name} {t!r} must be a non-empty topic without wildcards")


@dataclass(frozen=True)
class InferConfig:
    line: LineConfig
    rows: dict[str, Any]
    sources: list[dict[str, Any]] = field(default_factory=list)
    broker: dict[str, Any] | None = None
    output: OutputConfig = field(default_factory=OutputConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    file: str | None = None

    def validate(self) -> None:
        if self.line.model_source == "manifest" and self.broker is None:
            raise ValueError("model_source = 'manifest' needs a [broker] table")
        if (
            (self.output.topic or self.output.alarm_topic or self.line.command_topic)
            and self.output.broker is None
            and self.broker is None
        ):
            raise ValueError("an output or command topic needs [output.broker] or [broker]")

    def path(self, value: str) -> Path:
        """A path from the file, relative to the file's folder."""
        return resolve_path(self.file, value)


def parse_infer_config(doc: dict[str, Any], file: str | Path | None = None) -> InferConfig:
    cfg = parse(InferConfig, doc, file=file)
    cfg = replace(cfg, file=str(file) if file is not None else None)
    from firmware_adapters.rows import parse_row_mapping

    parse_row_mapping(cfg.rows, file=file)
    from firmware_adapters.config import parse_source

    for i, table in enumerate(cfg.sources):
        parse_source(table, file=file, where=f"sources[{i}]")
    for key in ("broker",):
        if getattr(cfg, key) is not None:
            broker_settings(getattr(cfg, key), file, key)
    if cfg.output.broker is not None:
        broker_settings(cfg.output.broker, file, "output.broker")
    return cfg


def load_infer_config(path: str | Path) -> InferConfig:
    """Read and validate ``line.toml``; :class:`ConfigError` names the file and key."""
    return parse_infer_config(load_toml(path), path)


def broker_settings(table: dict[str, Any], file: str | Path | None, where: str, **defaults: Any) -> Any:
    """``BrokerSettings`` from a table, with its file paths relative to the config file."""
    from broker_bridge.client import BrokerSettings

    return BrokerSettings.from_table(table, file, where, **defaults)


__all__ = [
    "CanaryConfig",
    "ConfigError",
    "InferConfig",
    "LineConfig",
    "MetricsConfig",
    "OutputConfig",
    "broker_settings",
    "load_infer_config",
    "parse_infer_config",
]
