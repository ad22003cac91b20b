"""The aggregator's TOML file, validated into frozen dataclasses.

Why one file with several tables: an operator configures one process in one
place; each table maps to one concern (identity and state, the broker, the
reduce step, what counts as a sane update, what is published, metrics), and
:func:`fedline.config.parse` names the file and the key on any mistake. Paths
are relative to the config file, so a deployment folder can be moved whole.

Example::

    [aggregator]
    federation = "plant-1"
    key_file = "keys/aggregator.key"
    enrollment_file = "keys/enrollment.json"
    state_dir = "state"
    seed = 0

    [model]                      # models.ModelSpec
    kind = "mlp"
    n_features = 5

    [broker]                     # broker_bridge.client.BrokerSettings
    url = "mqtt://127.0.0.1:1883"
    username = "aggregator"
    password_file = "credentials/aggregator.password"

    [strategy]
    kind = "fedbuff"             # fedasync | fedbuff | fedavg
    buffer_size = 5
    staleness = "polynomial"     # constant | polynomial | hinge
    a = 0.5

    [validation]
    max_norm = 100.0

    [publish]
    retain_versions = 3

    [metrics]
    port = 19310                 # Prometheus endpoint (no port: off; 0: any free port)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aggregator import mda
from aggregator.evaluation import EvaluationConfig
from broker_bridge.client import BrokerSettings
from fedline.config import ConfigError, load_toml, parse, resolve_path
from fedline.metrics import MetricsConfig
from models.spec import ModelSpec


@dataclass(frozen=True)
class AggregatorSection:
    """Identity, keys and where the durable state lives."""

    federation: str
    key_file: str
    enrollment_file: str
    state_dir: str
    seed: int = 0  # seed of version 0; every edge builds the same version 0 from it
    topic_prefix: str = "fedline"
    keep_checkpoints: int = 10  # model checkpoints kept in the store (lineage is kept for all)
    # per site, verdicts of the newest this-many counters are kept (pruned as versions are made, so the store
    # does not grow with every update ever sent); a resend of an older counter is answered as a replay, so
    # this must exceed every site's outbox.max_count (default 1000)
    keep_verdicts: int = 10_000
    workers: int = 2  # threads that open sealed updates in parallel (NaCl and numpy release the GIL)
    reassembly_timeout_s: float = 300.0
    reassembly_max_bytes: int = 64 * 1024 * 1024  # per site: incomplete messages held at once
    # all sites together: beyond it the site holding the most loses its oldest half-sent message (so many
    # sites, or one flooding, cannot hold sites x reassembly_max_bytes of memory)
    reassembly_total_max_bytes: int = 1024 * 1024 * 1024
    fsync: bool = False  # SQLite synchronous=FULL (survives power loss) instead of NORMAL (survives kill -9)
    # the enrollment file is re-read when it changes (checked this often): revoking a site is deleting its
    # entry, and starts a new federation key epoch the site never gets
    enrollment_poll_s: float = 2.0
    # a site whose status says it is behind (older version or key epoch: it missed the retained state, e.g. on
    # another node of a broker cluster) gets the current state again, at most this often (aggregator.catchup)
    catchup_interval_s: float = 10.0

    def validate(self) -> None:
        from broker_bridge.topics import validate_site_id

        if not 0.5 <= self.catchup_interval_s <= 3600:
            raise ValueError(f"catchup_interval_s must be between 0.5 and 3600, got {self.catchup_interval_s}")

        if not 0.1 <= self.enrollment_poll_s <= 3600:
            raise ValueError(f"enrollment_poll_s must be between 0.1 and 3600, got {self.enrollment_poll_s}")

        validate_site_id(self.federation, "federation")
        validate_site_id(self.topic_prefix, "topic_prefix")
        if self.keep_checkpoints < 1:
            raise ValueError("keep_checkpoints must be at least 1")
        if self.keep_verdicts < 10:
            raise ValueError(
                f"keep_verdicts must be at least 10 (and above every site's outbox.max_count), got {self.keep_verdicts}"
            )
        if not 1 <= self.workers <= 64:
            raise ValueError("workers must be between 1 and 64")
        if self.reassembly_total_max_bytes < self.reassembly_max_bytes:
            raise ValueError(
                f"reassembly_total_max_bytes ({self.reassembly_total_max_bytes}) must be at least "
                f"reassembly_max_bytes ({self.reassembly_max_bytes})"
            )


@dataclass(frozen=True)
class StrategyConfig:
    """The reduce step: which algorithm, how staleness weighs, which robust option, what keeps it fair."""

    kind: Literal["fedasync", "fedbuff", "fedavg"] = "fedbuff"
    alpha: float = 0.5  # FedAsync mixing rate
    # FedAsync: "mix" is the paper's x_t = (1 - a_t) x_{t-1} + a_t (x_base + delta); "delta" is x + a_t delta
    fedasync_form: Literal["mix", "delta"] = "mix"
    # FedAsync: a site's α_t is scaled by min(1, seconds since its last applied update / site_interval_s),
    # so a site that sends faster gains no influence (aggregator.site_rate); 0 = off
    site_interval_s: float = 60.0
    staleness: Literal["constant", "polynomial", "hinge"] = "polynomial"
    a: float = 0.5  # polynomial exponent; hinge slope
    b: float = 4.0  # hinge: staleness up to b weighs 1
    max_staleness: int = 20  # older updates are dropped with a "stale" receipt
    # FedBuff K: the updates (one per site) a version sums, f(s)/K each; at most the enrolled sites (FedAvg: the
    # cohort, every site). Under MDA (the default reduce) a buffer waits for K + mda_f and keeps K (aggregator.mda)
    buffer_size: int = 10
    # a buffer whose first update has waited this long is reduced with what it holds (0 = wait for K):
    # when a site drops off the network, versions keep coming from the others without any of them
    # spending its privacy budget twice on one base to fill the buffer. FedAvg: the round's deadline.
    buffer_timeout_s: float = 0.0
    # no version combines fewer distinct sites: a smaller buffer waits (issue 13); FedAsync needs 1
    min_sites: int = 3
    quorum: int = 0  # distinct sites a timed-out buffer (a FedAvg round) needs; 0 = min_sites
    server_lr: float = 1.0
    server_momentum: float = 0.0
    # "auto": minimum-diameter averaging ("mda") wherever it can run (FedBuff/FedAvg, K >= 3, no secure
    # aggregation, no sample weighting), else the plain mean (aggregator.strategies.reduce_choice); "none" = the
    # mean always; "median" / "trimmed_mean": coordinate-wise (Yin et al. 2018)
    # "fltrust": each update weighed by its cosine with the aggregator's own update on the [evaluation] rows
    # (Cao et al. 2021; aggregator.root_update), needs [evaluation]; "mda": the mean of the slots that lie
    # closest together, leaving the farthest mda_f out whole (aggregator.mda)
    # "cclip": centered clipping around the previous version's step (Karimireddy et al. 2021; aggregator.cclip)
    robust: Literal["auto", "none", "median", "trimmed_mean", "fltrust", "mda", "cclip"] = "auto"
    # centered clipping's radius, a multiple of the version's median distance from the previous step, and its
    # iterations L (1 keeps each slot at most f(s)/K: aggregator.cclip)
    cclip_tau: float = 1.0
    cclip_iters: int = 1
    # slots MDA leaves out of each version: a buffer waits for K + mda_f updates and sums the K it keeps, each at
    # f(s)/K (fewer sites enrolled: all of them, mda_f left out; a majority is always kept: aggregator.mda.sizes)
    mda_f: int = 1
    trim: float = 0.1  # fraction dropped at each end by trimmed_mean
    # clip each delta to this L2 norm before the reduce; unset = derived from [dp] (aggregator.normbound); 0 = off
    norm_bound: float | None = None
    # also clip each delta to the median norm of its buffer (one update per site, so the median is an honest
    # site's as long as most of the buffer is honest): a long delta counts no more than a typical one
    clip_to_median: bool = True
    # with clip_to_median, under the median or trimmed mean, rescale every delta to that bound, up as well as down
    # (aggregator.robust.rescale): a short backdoored delta otherwise sits between the honest values in many
    # coordinates and the median picks it there (RELIABILITY.md, issue 14's "samples" attack)
    norm_to_median: bool = True
    # under MDA (RELIABILITY.md, robust14f/robust14g; 0 = off): with g >= 1, each input column j of the first layer's
    # weights (aggregate.input_tensor: out x in; none for cnn1d) drops the kept slots that column's own MDA subset
    # leaves out, where the kept subset's diameter in column j exceeds g times that subset's; such a slot weighs 0
    # in column j and f(s)/K elsewhere (aggregate.column_vetoes). Only ever drops weight, never adds
    input_column_veto: float = 1.2
    # weigh by min(n_samples, sample_cap) / sum instead of 1/K; the cap is the aggregator's, never the claim
    sample_weighting: bool = False
    sample_cap: float = 0.0
    # FedBuff buffers become secure-aggregation cohorts: the aggregator sees only each cohort's sum
    secure_aggregation: bool = False

    def validate(self) -> None:
        """Refuse a strategy that cannot run, or runs but leaks or misleads (each error names the key)."""
        self._check_ranges()
        if self.sample_cap < 0:
            raise ValueError("sample_cap must be >= 0")
        if self.sample_weighting and self.sample_cap <= 0:
            raise ValueError(
                "sample_weighting = true needs sample_cap > 0: the aggregator, not the site's claim, "
                "bounds a weight (set it to a plant's typical rows per update)"
            )
        if self.secure_aggregation:
            if self.robust not in ("auto", "none"):
                raise ValueError(
                    f"robust = {self.robust!r} cannot run with secure_aggregation = true: masking hides "
                    "each update, so no coordinate-wise statistic can be computed (the cohort-sum norm "
                    "bound and client-side clipping are what remain); leave robust out (the default then keeps "
                    "the mean) or set secure_aggregation = false to have the median"
                )
            if self.kind != "fedbuff":
                raise ValueError(
                    f"secure_aggregation = true needs kind = 'fedbuff' (a buffer becomes a cohort); "
                    f"{self.kind!r} cannot be secure"
                    + (": FedAsync applies one update per version" if self.kind == "fedasync" else "")
                )
            if self.norm_bound == 0:
                raise ValueError(
                    "secure_aggregation = true needs a per-site norm bound (norm_bound > 0, or left out "
                    "to derive it from [dp]): it sizes the fixed-point range and bounds the cohort sum"
                )
            if self.sample_weighting:
                raise ValueError(
                    "sample_weighting = true cannot run with secure_aggregation = true: a cohort's "
                    "members are weighed 1/K (their sample counts are claims the masked sum cannot check)"
                )
            if self.min_sites < 3:
                raise ValueError(
                    f"secure_aggregation = true needs min_sites >= 3 (a cohort of 2 reveals each "
                    f"member's update to the other), got {self.min_sites}"
                )
        if self.robust in ("auto", "mda"):
            mda.check(self.mda_f, self.buffer_size)
        if self.robust == "cclip" and self.server_momentum > 0:
            raise ValueError(
                'robust = "cclip" centres on the previous version\'s step, which it keeps where server momentum keeps '
                "its buffer: set server_momentum = 0 (centered clipping is itself the history term)"
            )
        if self.kind == "fedasync" and self.robust not in ("auto", "none"):
            raise ValueError(
                f"robust = {self.robust!r} needs several updates per reduce: "
                "use kind = 'fedbuff' or 'fedavg' (FedAsync applies one update at a time)"
            )

    def _check_ranges(self) -> None:
        """Each number in its range, and the site counts consistent (min_sites, quorum, buffer_size)."""
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if self.site_interval_s < 0:
            raise ValueError(f"site_interval_s must be >= 0 (0 = off), got {self.site_interval_s}")
        if self.a < 0 or self.b < 0:
            raise ValueError("a and b must be non-negative")
        if self.max_staleness < 0:
            raise ValueError("max_staleness must be >= 0")
        if self.buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        if self.buffer_timeout_s < 0:
            raise ValueError(f"buffer_timeout_s must be >= 0 (0 = off), got {self.buffer_timeout_s}")
        if self.min_sites < 1:
            raise ValueError(f"min_sites must be at least 1, got {self.min_sites}")
        if self.quorum < 0:
            raise ValueError(f"quorum must be >= 0 (0 = min_sites), got {self.quorum}")
        if self.quorum and self.quorum < self.min_sites:
            raise ValueError(f"quorum ({self.quorum}) must be at least min_sites ({self.min_sites})")
        if self.kind == "fedasync" and self.min_sites != 1:
            raise ValueError(
                f"kind = 'fedasync' makes every version from one site's update, which any member "
                f"can read as w[v+1] - w[v]; min_sites is {self.min_sites}: use 'fedbuff', or set "
                f"min_sites = 1 to accept that leak"
            )
        if self.kind == "fedbuff" and self.buffer_size < self.min_sites:
            raise ValueError(
                f"buffer_size ({self.buffer_size}) must be at least min_sites ({self.min_sites}): "
                f"one update per site per buffer"
            )
        if self.server_lr <= 0:
            raise ValueError("server_lr must be positive")
        if not 0.0 <= self.server_momentum < 1.0:
            raise ValueError("server_momentum must be in [0, 1)")
        if self.input_column_veto != 0 and self.input_column_veto < 1:
            raise ValueError(f"input_column_veto must be 0 (off) or at least 1, got {self.input_column_veto}")
        if self.cclip_tau <= 0:
            raise ValueError(f"cclip_tau must be positive (a multiple of the median distance), got {self.cclip_tau}")
        if not 1 <= self.cclip_iters <= 10:
            raise ValueError(f"cclip_iters must be in [1, 10], got {self.cclip_iters}")
        if not 0.0 <= self.trim < 0.5:
            raise ValueError("trim must be in [0, 0.5)")
        if self.norm_bound is not None and self.norm_bound < 0:
            raise ValueError("norm_bound must be >= 0 (0 = off; leave it out to derive it from [dp])")

    @property
    def needed_sites(self) -> int:
        """Distinct sites a buffer must hold before it may become a version on timeout."""
        return max(self.min_sites, self.quorum)


@dataclass(frozen=True)
class DPConfig:
    """The federation's DP-SGD settings, as the sites are told to train: they bound an honest delta.

    Used only to derive ``[strategy] norm_bound`` and ``[validation] max_norm`` when those are not set
    (:mod:`aggregator.normbound`); a site's own header is never trusted for it.
    """

    clip_norm: float = 1.0  # the sites' max_grad_norm
    noise_multiplier: float = 1.0
    lr: float = 0.05
    momentum: float = 0.0
    batch_size: int = 64  # expected (Poisson) batch size
    steps: int = 100  # the most DP-SGD steps one update may take (epochs x steps per epoch)

    def validate(self) -> None:
        if self.clip_norm <= 0 or self.lr <= 0 or self.noise_multiplier < 0:
            raise ValueError("clip_norm and lr must be > 0, noise_multiplier >= 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError("momentum must be in [0, 1)")
        if self.batch_size < 1 or self.steps < 1:
            raise ValueError("batch_size and steps must be >= 1")


@dataclass(frozen=True)
class SecAggConfig:
    """Cohorts of secure aggregation (used when ``[strategy] secure_aggregation = true``).

    A cohort needs ``[strategy] min_sites`` online members, and as many submissions to complete.
    """

    max_sites: int = 100  # members of one cohort (each deals n^2 shares: keep it moderate)
    gather_s: float = 5.0  # wait this long for more online sites before a cohort smaller than all of them
    deadline_s: float = 300.0  # members submit within this; then the survivors are announced
    unmask_timeout_s: float = 120.0  # acks and answers within this after the deadline, or the cohort fails

    def validate(self) -> None:
        if self.max_sites < 3:
            raise ValueError(f"max_sites must be at least 3, got {self.max_sites}")
        if self.gather_s < 0 or self.deadline_s <= 0 or self.unmask_timeout_s <= 0:
            raise ValueError("gather_s must be >= 0, deadline_s and unmask_timeout_s > 0")


@dataclass(frozen=True)
class ValidationConfig:
    """What a sane update looks like; anything else is rejected with the reason."""

    max_norm: float | None = None  # L2 norm of the whole delta; unset = 4 x the norm bound derived from [dp]
    max_samples: int = 10_000_000
    min_samples: int = 1

    def validate(self) -> None:
        if self.max_norm is not None and self.max_norm <= 0:
            raise ValueError("max_norm must be positive")
        if not 1 <= self.min_samples <= self.max_samples:
            raise ValueError("need 1 <= min_samples <= max_samples")


@dataclass(frozen=True)
class PublishConfig:
    retain_versions: int = 3  # model versions whose chunks stay retained on the broker
    onnx: bool = True
    # "int8": each version is also published as its int8 step from the previous one, and the model is
    # defined as the sum of those steps (broker_bridge.quantised.model_step): sites follow the steps
    quantise: str = "off"

    def validate(self) -> None:
        if self.retain_versions < 1:
            raise ValueError("retain_versions must be at least 1")
        if self.quantise not in ("off", "int8"):
            raise ValueError(f'quantise must be "off" or "int8", got {self.quantise!r}')


@dataclass(frozen=True)
class IntakeConfig:
    """Intake workers (``aggregator.intake_worker``): other processes open the sites' updates for this one.

    ``workers`` 0 or 1: this process reads the sites' updates itself (the default). From 2, the aggregator
    is the reducer: it reads only the forwards of workers ``intake-0`` ... ``intake-<workers-1>``, each
    signed with the key whose public half is ``<keys_dir>/intake-<i>.pub.json`` (a worker reads its
    ``intake-<i>.key`` there).
    """

    workers: int = 0
    keys_dir: str = "keys"
    # a worker opens updates with this file (``fedline keys opening-key``: the aggregator's X25519 secret
    # without its signing key) rather than [aggregator] key_file; "" reads the key pair (and warns)
    opening_key_file: str = ""

    def validate(self) -> None:
        if not 0 <= self.workers <= 64:
            raise ValueError(f"workers must be between 0 and 64, got {self.workers}")


@dataclass(frozen=True)
class AggregatorConfig:
    """The whole file. Paths are resolved against the file's folder by :func:`load_config`."""

    aggregator: AggregatorSection
    model: ModelSpec
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    evaluation: EvaluationConfig | None = None
    intake: IntakeConfig = field(default_factory=IntakeConfig)
    file: str | None = None  # the file this was read from (set by load_config)

    def validate(self) -> None:
        try:
            self.broker.validate()
        except ValueError as exc:
            raise ConfigError(None, "broker", str(exc)) from None
        if self.strategy.robust == "fltrust" and self.evaluation is None:
            raise ConfigError(
                None,
                "strategy.robust",
                'robust = "fltrust" needs an [evaluation] table: its rows are the root dataset the aggregator '
                "trains its own reference update on (rows the aggregator owns, never plant data)",
            )
        if self.intake.workers >= 2 and self.strategy.secure_aggregation:
            raise ConfigError(
                None,
                "intake.workers",
                "intake workers forward opened deltas; secure aggregation's masked cohorts are run by the "
                "aggregator alone: set workers = 0 or secure_aggregation = false",
            )


def _resolve(cfg: AggregatorConfig, file: str | Path | None) -> AggregatorConfig:
    a = cfg.aggregator
    a = dataclasses.replace(
        a,
        key_file=str(resolve_path(file, a.key_file)),
        enrollment_file=str(resolve_path(file, a.enrollment_file)),
        state_dir=str(resolve_path(file, a.state_dir)),
    )
    intake = dataclasses.replace(
        cfg.intake,
        keys_dir=str(resolve_path(file, cfg.intake.keys_dir)),
        opening_key_file=str(resolve_path(file, cfg.intake.opening_key_file)) if cfg.intake.opening_key_file else "",
    )
    return dataclasses.replace(cfg, aggregator=a, intake=intake, file=str(file) if file is not None else None)


def parse_config(table: dict[str, Any], file: str | Path | None = None) -> AggregatorConfig:
    """Validate a parsed TOML document; relative paths are resolved against ``file``.

    The ``[broker]`` table goes through :meth:`BrokerSettings.from_table`, the one parser of broker tables
    (the edge's, the line's and the MQTT sources' too): the same keys, checks and path resolution everywhere.
    """
    broker_table = table.get("broker", {})
    if not isinstance(broker_table, dict):
        raise ConfigError(file if file is not None else "<config>", "broker", "must be a table")
    try:
        broker = BrokerSettings.from_table(broker_table, file, "broker")
        cfg = parse(AggregatorConfig, {**table, "broker": {}}, file=file)
    except ConfigError as exc:
        if exc.file == "<config>" and file is not None:
            raise ConfigError(file, exc.key, exc.message) from None
        raise
    return _resolve(dataclasses.replace(cfg, broker=broker), file)


def load_config(path: str | Path) -> AggregatorConfig:
    """Read and validate ``aggregator.toml``."""
    return parse_config(load_toml(path), path)
