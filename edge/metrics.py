"""Prometheus metrics of one edge agent (prometheus-client, own registry).

Why an own registry: tests run several agents in one process, and the
default registry would refuse the second set of metric names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from fedline.metrics import MetricsConfig, MetricsServer, new_registry


class EdgeMetrics:
    """The same figures as the retained status, plus counters of everything that happened."""

    def __init__(self, site: str) -> None:
        self.registry = r = new_registry()
        self.site = site
        self._privacy(r)
        self._stores(r)
        self._rounds(r)
        self._models_and_messages(r)
        self._data(r)
        self._server = MetricsServer(r)

    def _privacy(self, r: CollectorRegistry) -> None:
        """The privacy figures (the same as the status's privacy block)."""
        self.model_version = Gauge(
            "fedline_edge_model_version", "Global model version the site trains from", registry=r
        )
        self.epsilon = Gauge(
            "fedline_edge_epsilon_spent",
            "Per-record privacy loss epsilon: the largest over every row ever trained on",
            registry=r,
        )
        self.epsilon_global_history = Gauge(
            "fedline_edge_epsilon_global_history",
            "Epsilon one accountant over every round since enrollment would report (comparison only)",
            registry=r,
        )
        self.delta = Gauge("fedline_edge_delta", "Privacy delta of the epsilon figures", registry=r)
        self.rows_eligible = Gauge(
            "fedline_edge_rows_eligible", "Training rows the last round could sample", registry=r
        )
        self.rows_retired = Gauge(
            "fedline_edge_rows_retired", "Rows retired for good by their own budget or participation count", registry=r
        )
        self.epsilon_budget = Gauge(
            "fedline_edge_epsilon_budget", "Configured epsilon budget (0: privacy off)", registry=r
        )
        self.budget_exhausted = Gauge(
            "fedline_edge_budget_exhausted", "1 when the next release would exceed the budget", registry=r
        )

    def _stores(self, r: CollectorRegistry) -> None:
        """What the outbox and the dataset hold, and the broker link."""
        self.outbox_depth = Gauge("fedline_edge_outbox_depth", "Sealed updates waiting for a receipt", registry=r)
        self.outbox_bytes = Gauge(
            "fedline_edge_outbox_bytes", "Bytes of sealed updates waiting for a receipt", registry=r
        )
        self.rows = Gauge("fedline_edge_rows_stored", "Training examples in the local store", registry=r)
        self.connected = Gauge("fedline_edge_connected", "1 while connected to the broker", registry=r)

    def _rounds(self, r: CollectorRegistry) -> None:
        """Local rounds and the updates they sealed, published, settled or dropped."""
        self.rounds = Counter("fedline_edge_rounds", "Local training rounds finished", registry=r)
        self.rounds_skipped = Counter(
            "fedline_edge_rounds_skipped", "Triggers that did not train", ["reason"], registry=r
        )
        self.round_seconds = Gauge("fedline_edge_last_round_seconds", "Duration of the last local round", registry=r)
        self.sealed = Counter("fedline_edge_updates_sealed", "Updates sealed into the outbox", registry=r)
        self.published = Counter(
            "fedline_edge_updates_published", "Updates whose chunks the broker acknowledged", registry=r
        )
        self.receipts = Counter("fedline_edge_receipts", "Signed receipts by verdict", ["verdict"], registry=r)
        self.dropped = Counter("fedline_edge_outbox_dropped", "Updates dropped because the outbox was full", registry=r)

    def _models_and_messages(self, r: CollectorRegistry) -> None:
        """Global models taken or refused, and messages dropped as malformed."""
        self.models_loaded = Counter("fedline_edge_models_loaded", "Global models verified and loaded", registry=r)
        self.models_refused = Counter("fedline_edge_models_refused", "Global models refused", registry=r)
        self.models_refused_step = Counter(
            "fedline_edge_models_refused_step",
            "Signed global models refused because they moved too far from the current one (models.step_bound)",
            registry=r,
        )
        self.malformed = Counter(
            "fedline_edge_malformed_messages", "Messages counted and dropped", ["kind"], registry=r
        )
        self.secagg_replies_unsent = Counter(
            "fedline_edge_secagg_replies_unsent",
            "Secure-aggregation replies the broker never acknowledged (refused, no connection, or left at a stop)",
            registry=r,
        )

    def _data(self, r: CollectorRegistry) -> None:
        """Samples read and rows stored (or lost)."""
        self.samples = Counter("fedline_edge_samples", "Samples read from the sources", registry=r)
        self.examples = Counter("fedline_edge_examples", "Training examples stored", registry=r)
        self.examples_historical = Counter(
            "fedline_edge_examples_historical",
            "Training examples stored from samples marked historical (late data, e.g. Sparkplug is_historical)",
            registry=r,
        )
        self.outbox_write_failed = Counter(
            "fedline_edge_outbox_write_failed",
            "Outbox writes that failed and were rolled back (e.g. disk full), by operation; the row stays queued",
            ["op"],
            registry=r,
        )
        self.rows_lost = Counter(
            "fedline_edge_examples_lost", "Examples not stored (write failed, e.g. disk full)", registry=r
        )

    def serve(self, cfg: MetricsConfig, file: str | None = None) -> int | None:
        """Start the /metrics HTTP endpoint as ``[metrics]`` says; returns the bound port (None: not served)."""
        return self._server.start(cfg, service=f"edge:{self.site}", file=file)

    def stop(self) -> None:
        self._server.stop()

    def text(self) -> bytes:
        return generate_latest(self.registry)
