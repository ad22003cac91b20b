"""Prometheus metrics of a plant's uplink, on the plant aggregator's registry (one ``/metrics`` per plant).

Why: the plant's aggregator metrics say what its lines do; an operator of a plant tier also needs to
see its side of the central federation at a glance: is the link up, how many reduces wait in the
outbox (a long WAN cut shows here first), what the central aggregator answered, and which central
version the lines are served. These are the plant's own figures and stay on the plant's metrics port.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class UplinkMetrics:
    """The uplink's figures, registered on ``registry`` (the plant aggregator's)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.connected = Gauge(
            "fedline_plant_upstream_connected", "1 while the plant is connected to the central broker", registry=r
        )
        self.central_version = Gauge(
            "fedline_plant_central_version", "Newest central version adopted and served to the lines", registry=r
        )
        self.outbox_depth = Gauge(
            "fedline_plant_upstream_outbox_depth", "Plant deltas waiting for their central receipt", registry=r
        )
        self.outbox_bytes = Gauge(
            "fedline_plant_upstream_outbox_bytes", "Bytes of the plant deltas waiting in the outbox", registry=r
        )
        self.outbox_full = Gauge(
            "fedline_plant_upstream_outbox_full", "1 while a reduce waits because the outbox is full", registry=r
        )
        self.deltas_queued = Counter(
            "fedline_plant_deltas_queued", "Plant reduces sealed and queued for the central aggregator", registry=r
        )
        self.deltas_published = Counter(
            "fedline_plant_deltas_published", "Plant deltas published upstream (resends included)", registry=r
        )
        self.receipts = Counter(
            "fedline_plant_receipts", "Central receipts for the plant's deltas, by verdict", ["verdict"], registry=r
        )
        self.models_refused = Counter(
            "fedline_plant_models_refused", "Central models refused (signature, shapes, step bound)", registry=r
        )
        self.messages_dropped = Counter(
            "fedline_plant_messages_dropped",
            "Central messages dropped as malformed or forged (receipts, grants, chunks)",
            ["kind"],
            registry=r,
        )
        self.secagg_replies_unsent = Counter(
            "fedline_plant_secagg_replies_unsent",
            "Central cohort replies the broker never acknowledged (refused, no connection, or left at a stop)",
            registry=r,
        )

    def outbox(self, depth: int, nbytes: int, full: bool) -> None:
        self.outbox_depth.set(depth)
        self.outbox_bytes.set(nbytes)
        self.outbox_full.set(1 if full else 0)
