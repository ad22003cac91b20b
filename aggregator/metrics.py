"""Prometheus metrics of one aggregator (prometheus-client), on its own registry.

Why a registry per instance: tests run several aggregators in one process,
and the default global registry would refuse the second set of names.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from fedline.metrics import MetricsConfig, MetricsServer, new_registry


class Metrics:
    def __init__(self) -> None:
        self.registry = new_registry()
        r = self.registry
        self.updates = Counter("fedline_aggregator_updates", "Updates decided, by verdict", ["verdict"], registry=r)
        self.rejections = Counter(
            "fedline_aggregator_rejections", "Rejected updates, by reason", ["reason"], registry=r
        )
        self.duplicates = Counter(
            "fedline_aggregator_duplicates", "Resent updates answered with their original verdict", registry=r
        )
        self.staleness = Histogram(
            "fedline_aggregator_staleness",
            "Staleness of accepted and stale updates",
            buckets=(0, 1, 2, 3, 5, 8, 13, 21, 34, 55, float("inf")),
            registry=r,
        )
        self.buffer_fill = Gauge("fedline_aggregator_buffer_fill", "Updates waiting in the FedBuff buffer", registry=r)
        self.buffer_timeouts = Counter(
            "fedline_aggregator_buffer_timeouts",
            "Buffers reduced with fewer than K updates after buffer_timeout_s",
            registry=r,
        )
        self.version = Gauge("fedline_aggregator_model_version", "Current global model version", registry=r)
        self.rate = Gauge(
            "fedline_aggregator_updates_per_second", "Updates decided per second over the last 60 s", registry=r
        )
        self.chunk_errors = Counter(
            "fedline_aggregator_chunk_errors", "Chunks that could not be reassembled", registry=r
        )
        self.reassembly_evicted = Counter(
            "fedline_aggregator_reassembly_evicted",
            "Half-sent updates forgotten to keep all sites under reassembly_total_max_bytes",
            registry=r,
        )
        self.retained_cleared = Counter(
            "fedline_aggregator_retained_updates_cleared",
            "Retained messages on update topics, cleared (a site parking data in the broker)",
            ["site"],
            registry=r,
        )
        self.catchups = Counter(
            "fedline_aggregator_catchups",
            "Sites sent the current key and model again because their status said they were behind",
            registry=r,
        )
        self.recovery = Counter(
            "fedline_aggregator_recovery_requests",
            "Recovery requests of sites that lost their data directory, by outcome (answered, refused, rate_limited)",
            ["outcome"],
            registry=r,
        )
        self.reduce = Gauge(
            "fedline_aggregator_reduce",
            "The reduce in force (1 on its label): mean, median or trimmed_mean ([strategy] robust)",
            ["reduce"],
            registry=r,
        )
        self._recent: deque[float] = deque()
        self._per_update_paths()
        self._publishes()

    def _publishes(self) -> None:
        """What leaves the aggregator without its acknowledgement awaited (broker_bridge.publish_window)."""
        self.unsent = Counter(
            "fedline_aggregator_publishes_unsent",
            "Publishes never acknowledged (refused, no connection, or outstanding at a stop), by kind (receipt, secagg)",
            ["kind"],
            registry=self.registry,
        )

    def _per_update_paths(self) -> None:
        """What the per-update calls (:meth:`decided`, :meth:`staleness_seen`, :meth:`fill`) need, set up once: they
        run for every update on the intake's hot path.

        Each holds the value cell of a prometheus-client child (``_value``, the float and its lock that ``inc`` and
        ``set`` end in), looked up once per label: ``labels()`` validates and locks on every call (a few µs per
        update), and ``inc``/``observe``/``set`` then check that the metric is observable, the amount's sign and an
        exemplar before that one locked add. In a tight loop on the shared VM: ``decided`` 0.9 -> 0.7 µs, the
        staleness ``observe`` 1.2 -> 0.8, the fill's ``set`` 0.5 -> 0.37 (about 0.7 µs per buffered update; more in
        place, between the opening threads' decrypts). The values are those the public calls would leave: a counter's child adds 1, the staleness
        histogram adds ``s`` to its sum and 1 to the one bucket the first bound ``>= s`` names (its ``observe``
        loop), the gauge holds ``float(n)`` (``tests/aggregator/test_metrics.py`` compares them with the public
        calls' exposition). Without those cells (another prometheus-client) each falls back to the public call.
        """
        self._verdict_cells: dict[str, Any] = {}
        self._reason_cells: dict[str, Any] = {}
        self._staleness_cells: dict[int, tuple[Any, Any]] = {}  # staleness -> (the sum's cell, its bucket's cell)
        self._fill_cell = getattr(self.buffer_fill, "_value", None)
        self._histogram_cells = all(hasattr(self.staleness, a) for a in ("_sum", "_buckets", "_upper_bounds"))
        # the rate is worked out when it is read (a scrape, ``value``), not on every decided update
        self.rate.set_function(self._rate)

    @staticmethod
    def _cell(cells: dict[str, Any], metric: Counter, label: str) -> Any:
        """The value cell of ``metric``'s child for ``label`` (the child itself without one: its ``inc``)."""
        cell = cells.get(label)
        if cell is None:
            child = metric.labels(label)
            cell = cells[label] = getattr(child, "_value", child)
        return cell

    def decided(self, verdict: str, reason: str | None = None, arrival: bool = True) -> None:
        """Count a verdict. ``arrival=False`` for a buffered update's later "applied": it is not a new update."""
        self._cell(self._verdict_cells, self.updates, verdict).inc(1)
        if verdict == "rejected" and reason:
            self._cell(self._reason_cells, self.rejections, reason).inc(1)
        if not arrival:
            return
        now = time.monotonic()
        self._recent.append(now)
        while now - self._recent[0] > 60.0:  # never empties: ``now`` was just appended
            self._recent.popleft()

    def staleness_seen(self, s: int) -> None:
        """``staleness.observe(s)`` for an update's staleness (an int), through the cells of its bucket."""
        cells = self._staleness_cells.get(s)
        if cells is None:
            # a bool, or a staleness past any bucket's bound (at most one cell pair per value up to it): the public call
            if not self._histogram_cells or type(s) is not int or not 0 <= s <= 64:
                self.staleness.observe(s)
                return
            h = self.staleness
            bucket = next(i for i, bound in enumerate(h._upper_bounds) if s <= bound)  # observe's own loop
            cells = self._staleness_cells[s] = (h._sum, h._buckets[bucket])
        cells[0].inc(s)
        cells[1].inc(1)

    def fill(self, n: int) -> None:
        """``buffer_fill.set(n)``, through its cell."""
        if self._fill_cell is None:
            self.buffer_fill.set(n)
        else:
            self._fill_cell.set(float(n))

    def _rate(self) -> float:
        """Updates decided per second over the last 60 s, as of the newest one (read from another thread:
        only the deque's length and ends are read, each an atomic operation)."""
        try:
            first, last, n = self._recent[0], self._recent[-1], len(self._recent)
        except IndexError:
            return 0.0
        return n / max(1.0, min(60.0, last - first))

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 if never set): for tests and ``status``."""
        v = self.registry.get_sample_value(name, labels or {})
        return float(v or 0.0)

    def serve(self, port: int, bind: str = "127.0.0.1") -> MetricsServer:
        """Serve /metrics on ``bind:port`` (0: any free port); the service uses :class:`MetricsServer` directly."""
        server = MetricsServer(self.registry)
        server.start(MetricsConfig(host=bind, port=port), service="aggregator")
        return server
