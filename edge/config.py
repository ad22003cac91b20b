"""The site configuration (``site.toml``) of one edge agent.

Why the sections are dataclasses: :func:`fedline.config.parse` then refuses
unknown keys and wrong types with the file and dotted key in the message. The
``broker``, ``sources`` and ``rows`` tables are passed through to the parts that
own them (``broker_bridge.client.BrokerSettings``, ``firmware_adapters.build_source``
and ``firmware_adapters.rows.RowMapping``)
so their checks and their error messages stay in one place.

Example::

    site = "press-3"
    federation = "plant-a"
    data_dir = "state/press-3"        # dataset, outbox, privacy ledger, last good model
    model_dir = "models/press-3"      # personalised ONNX for the line inference

    [keys]
    private = "keys/press-3.key"
    enrollment = "keys/enrollment.json"

    [broker]
    url = "mqtt://127.0.0.1:1883"

    [[sources]]                        # firmware_adapters.build_source tables
    kind = "csv"
    path = "data/ai4i2020.csv"

    [rows]                             # firmware_adapters.rows.RowMapping
    label = "Machine failure"
    features = [{ tag = "Air temperature [K]", range = [295.0, 305.0] },
                { tag = "Torque [Nm]", range = [0.0, 80.0] },
                { tag = "Rotational speed [rpm]", range = [1100.0, 2900.0] }]

    [model]
    kind = "mlp"
    n_features = 3
    personal = ["head."]

    [training]
    every_rows = 500
    every_s = 300

    [privacy]                          # or: privacy = "off" (explicit opt-out, warned at start-up)
    epsilon = 8.0
    delta = 1e-5
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge.personal import PersonalConfig
from fedline.config import ConfigError, load_toml, parse, resolve_path
from fedline.metrics import MetricsConfig
from models.spec import ModelSpec
from models.step_bound import StepBound as AdoptConfig  # [adopt]: how far a new global model may move


@dataclass(frozen=True)
class KeysConfig:
    """The site's private key file (0600) and the federation's enrollment (aggregator's public keys)."""

    private: str
    enrollment: str


@dataclass(frozen=True)
class DatasetConfig:
    """Bounded local store: oldest rows evicted first; a fixed share held out for evaluation.

    How rows are held out (:mod:`edge.dataset`): with ``group_column`` (a tag
    naming the unit: machine, engine, batch) by unit, so a unit never straddles
    training and validation and a window never spans two units; otherwise by
    time (the newest rows), or at random only with ``split = "random"`` for
    rows that are independent.
    """

    max_rows: int = 50_000
    holdout_fraction: float = 0.1
    # a row leaves training this many seconds after it was stored (its own age: the sliding window the
    # per-record accounting assumes); 0 = only by its own privacy budget. ``max_rows`` stays a storage cap:
    # size it above rows/s x max_age_s, since evicting by count makes a row's rounds depend on others
    max_age_s: float = 0.0
    split: Literal["time", "random"] = "time"
    group_column: str | None = None

    @property
    def effective_split(self) -> Literal["time", "random", "group"]:
        return "group" if self.group_column else self.split

    def validate(self) -> None:
        if self.max_age_s < 0:
            raise ValueError(f"max_age_s must be >= 0, got {self.max_age_s}")
        if self.max_rows < 10:
            raise ValueError(f"max_rows must be at least 10, got {self.max_rows}")
        if not 0.0 <= self.holdout_fraction < 0.9:
            raise ValueError(f"holdout_fraction must be in [0, 0.9), got {self.holdout_fraction}")
        if self.group_column is not None and not self.group_column.strip():
            raise ValueError("group_column must name a tag (or be left out)")


@dataclass(frozen=True)
class TrainingConfig:
    """When and how a local round runs: every ``every_s`` seconds (and on a new version with ``on_new_model``).

    ``every_rows`` > 0 also triggers on row counts (and skips timer rounds without new rows): a schedule
    that depends on the rows themselves, which the per-record privacy argument excludes (warned at start).
    """

    every_rows: int = 0
    every_s: float = 600.0
    min_rows: int = 100
    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.0
    max_train_rows: int = 0  # 0 = all stored training rows; else the newest N
    # also train as soon as a new global version is adopted: rounds then follow the federation (each
    # version gets a fresh update from this site) and ε is not spent twice on one stale base; the first
    # round then starts as soon as a source has delivered its backlog (a historian replay)
    on_new_model: bool = False
    threads: int = 1  # torch intra-op threads for a round (a line PC has other work)
    seed: int = 0
    # no further round on a base version while this many updates on it are undecided (no receipt yet, or
    # waiting in the aggregator's buffer, where another would only replace it): an unreachable aggregator
    # then costs at most one round of privacy budget per base version, and a quick timer none on replacements
    max_pending_per_base: int = 1
    # > 0: plan q and steps for this many rows whatever is stored, so they do not depend on the row count
    plan_rows: int = 0

    def validate(self) -> None:
        if self.every_rows < 0 or self.every_s <= 0:
            raise ValueError("every_rows must be >= 0 (0: rounds by time only) and every_s > 0")
        if self.max_pending_per_base < 1 or self.plan_rows < 0:
            raise ValueError("max_pending_per_base must be >= 1 and plan_rows >= 0")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
        if self.min_rows < 2:
            raise ValueError(f"min_rows must be at least 2, got {self.min_rows}")


@dataclass(frozen=True)
class PrivacyConfig:
    """Record-level DP-SGD with per-record accounting (``edge.ledger_privacy``).

    ``noise_multiplier`` is σ (noise std / clip norm), ``max_grad_norm`` the
    per-sample clip. Every row keeps its own ledger of the rounds it was in; a
    row retires once one more round would take its ε past ``epsilon`` (or
    after ``max_rounds_per_row`` rounds, if set), and the site keeps
    publishing on the rows that have budget left. ``max_releases`` (0: none)
    caps the site's total releases. ``window_accounting`` says what protects
    a raw sample when windows overlap: ``group`` accounts it over the
    ``ceil(window/stride)`` examples it is in, ``disjoint`` refuses overlap.
    ``accountant`` must be ``rdp`` (per-record composition adds RDP curves).
    """

    epsilon: float = 8.0
    delta: float = 1e-5
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    accountant: Literal["rdp", "prv"] = "rdp"
    secure_rng: bool = False  # noise as Opacus secure_mode draws it (against floating-point attacks; 4x the draws)
    max_rounds_per_row: int = 0  # participation cap per row (0: only the ε budget retires rows)
    max_releases: int = 0  # cap on the site's total releases (0: none; the site never stops for budget)
    window_accounting: Literal["group", "disjoint"] = "group"

    def validate(self) -> None:
        if self.max_rounds_per_row < 0 or self.max_releases < 0:
            raise ValueError("max_rounds_per_row and max_releases must be >= 0")
        if self.epsilon <= 0 or not 0 < self.delta < 1:
            raise ValueError("epsilon must be > 0 and delta in (0, 1)")
        if self.noise_multiplier <= 0 or self.max_grad_norm <= 0:
            raise ValueError("noise_multiplier and max_grad_norm must be > 0")


@dataclass(frozen=True)
class OutboxConfig:
    """Store-and-forward bounds, what to do when full, and how updates go out.

    Updates leave strictly in counter order with at most ``max_in_flight``
    awaiting a receipt; one that gets no receipt within ``resend_after_s`` is
    sent again before anything newer. More than 1 in flight is faster after an
    outage but lets a lost update arrive after a newer one, which an aggregator
    that guards replays by "counter above the last decided" refuses.
    """

    max_bytes: int = 256 * 1024 * 1024
    max_count: int = 1000
    # stop_training: never drop an update whose privacy cost is paid; drop_oldest drops (counted, logged)
    policy: Literal["drop_oldest", "stop_training"] = "stop_training"
    resend_after_s: float = 120.0  # sent but no receipt after this long: send again
    max_in_flight: int = 1  # updates sent without a receipt yet; 1 keeps the aggregator seeing counters in order

    def validate(self) -> None:
        if self.max_bytes < 1024 or self.max_count < 1:
            raise ValueError("max_bytes must be >= 1024 and max_count >= 1")
        if self.max_in_flight < 1 or self.resend_after_s <= 0:
            raise ValueError("max_in_flight must be >= 1 and resend_after_s > 0")


@dataclass(frozen=True)
class RecoveryConfig:
    """What a site does when it starts from an empty data directory (``edge.recovery``).

    ``ask_aggregator`` (default on): ask the aggregator for the last counter and privacy history it
    accepted from this site, and publish nothing until the answer comes (re-asked every ``resend_s``).
    Off only where no aggregator answers (an offline test or benchmark): a lost data directory then
    restarts ε at 0 and the counter at 1.
    """

    ask_aggregator: bool = True
    resend_s: float = 5.0

    def validate(self) -> None:
        if self.resend_s <= 0:
            raise ValueError(f"resend_s must be > 0, got {self.resend_s}")


@dataclass(frozen=True)
class UpdateConfig:
    """How the delta travels: ``quantise = "int8"`` sends 8-bit values with stochastic rounding (issue 19).

    About 0.25x the bytes of float32; the rounding runs after the DP noise (post-processing: epsilon
    is unchanged) and is unbiased, within one step (block max / 127) per value
    (:mod:`broker_bridge.quantised`). Off by default. Not with ``secure_aggregation``, which encodes
    the delta into its own field (refused at load).
    """

    quantise: Literal["off", "int8"] = "off"

    @property
    def encoding(self) -> str:
        """The update header's ``encoding``."""
        return "float32" if self.quantise == "off" else self.quantise


@dataclass(frozen=True)
class EdgeConfig:
    """One edge agent. Paths are relative to the config file's folder."""

    site: str
    federation: str
    data_dir: str
    model_dir: str
    keys: KeysConfig
    broker: dict[str, Any]
    sources: list[dict[str, Any]]
    rows: dict[str, Any]
    model: ModelSpec
    topic_prefix: str = "fedline"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: Literal["off"] | PrivacyConfig = field(default_factory=PrivacyConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    personal: PersonalConfig = field(default_factory=PersonalConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    adopt: AdoptConfig = field(default_factory=AdoptConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    status_interval_s: float = 30.0
    # train only for secure-aggregation cohorts; send masked updates (edge.secagg_member)
    secure_aggregation: bool = False
    model_seed: int = 0  # seed of version 0 (must match the aggregator's)
    file: str | None = None  # the file this was read from (set by load_edge_config)

    def validate(self) -> None:
        from broker_bridge.topics import validate_site_id

        validate_site_id(self.site)
        validate_site_id(self.federation, "federation")
        if not self.sources:
            raise ValueError("sources must list at least one [[sources]] table")

    @property
    def dp(self) -> PrivacyConfig | None:
        """The privacy settings, or None when privacy is explicitly off."""
        return None if isinstance(self.privacy, str) else self.privacy

    def path(self, value: str) -> Path:
        """A path from this config, resolved relative to its file."""
        return resolve_path(self.file, value)


def parse_edge_config(table: dict[str, Any], file: str | Path | None = None) -> EdgeConfig:
    """Validate a site table; :class:`ConfigError` names the file and key."""
    if "file" in table:
        raise ConfigError(file, "file", "unknown key")
    cfg = parse(EdgeConfig, table, file=file)
    if file is not None:
        object.__setattr__(cfg, "file", str(file))
    check_rows_fit_model(cfg)
    if cfg.secure_aggregation and cfg.update.quantise != "off":
        raise ConfigError(
            file,
            "update.quantise",
            f"{cfg.update.quantise!r} cannot be combined with secure_aggregation = true: secure aggregation "
            "encodes each delta into its own 32-bit field (broker_bridge/secagg/quantise.py) and masks it "
            'there; remove update.quantise or set it to "off"',
        )
    return cfg


def row_mapping(cfg: EdgeConfig):
    """The ``[rows]`` table as ``firmware_adapters.rows.RowMapping`` (errors name ``rows.*``)."""
    from firmware_adapters.rows import parse_row_mapping

    return parse_row_mapping(cfg.rows, file=cfg.file, where="rows")


def row_shape(mapping) -> tuple[int, ...]:
    """The shape of the rows the mapping makes (as ``RowBuilder.shape``)."""
    n = len(mapping.features)
    if mapping.aggregate_s is not None:
        return (n * len(mapping.aggregates),)
    return (mapping.window, n) if mapping.window > 1 else (n,)


def check_rows_fit_model(cfg: EdgeConfig) -> None:
    """The rows must have the model's input shape, and a label exactly when the task needs one."""
    mapping = row_mapping(cfg)
    spec = cfg.model
    shape = row_shape(mapping)
    if shape != spec.input_shape:
        raise ConfigError(
            cfg.file,
            "model",
            f"rows make inputs of shape {shape} (features, window, aggregates) "
            f"but the model reads {spec.input_shape} (n_features, window)",
        )
    if spec.task == "anomaly" and mapping.label is not None:
        raise ConfigError(cfg.file, "rows.label", "an anomaly model trains without labels; remove rows.label")
    if spec.task != "anomaly" and mapping.label is None:
        raise ConfigError(cfg.file, "rows.label", f"task {spec.task!r} needs a label tag")
    if (
        cfg.dp is not None
        and cfg.dp.window_accounting == "disjoint"
        and mapping.window > 1
        and mapping.stride < mapping.window
    ):
        raise ConfigError(
            cfg.file,
            "rows.stride",
            f"privacy.window_accounting = 'disjoint' needs stride >= window "
            f"({mapping.window}), got {mapping.stride}; or account the group ('group')",
        )
    if spec.task != "anomaly" and mapping.task != spec.task:
        raise ConfigError(cfg.file, "rows.task", f"rows.task is {mapping.task!r} but model.task is {spec.task!r}")


def load_edge_config(path: str | Path) -> EdgeConfig:
    """Read and validate ``site.toml``."""
    return parse_edge_config(load_toml(path), path)
