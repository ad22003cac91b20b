"""The one ``[metrics]`` table and the one Prometheus endpoint every fedline service serves.

Why one module: the aggregator, the edge agent and the line each had a table of
their own, and ``port = 0`` meant "off" in two of them and "any free port" in
the third. Here it has one meaning everywhere:

- no ``port`` key (the default): nothing is served;
- ``port = 0``: any free port (tests; the port chosen is logged as ``metrics.serving``);
- ``port = N``: that port.

Every registry made by :func:`new_registry` carries the standard ``process_*``
(CPU seconds, resident memory, open file descriptors, start time) and
``python_*`` (GC, interpreter) series next to the service's own, as the
Prometheus client conventions expect; a registry per service, not the global
default one, because tests run several services in one process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, start_http_server

from fedline.logs import event

log = logging.getLogger("fedline.metrics")


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: where ``/metrics`` is served. No ``port``: not served; 0: any free port."""

    host: str = "127.0.0.1"
    port: int | None = None

    def validate(self) -> None:
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535 (0: any free port), got {self.port}")
        if not self.host:
            raise ValueError("host must be an address, e.g. 127.0.0.1 or 0.0.0.0")


def new_registry() -> CollectorRegistry:
    """A registry of a service's own, with the process_* and python_* collectors registered."""
    r = CollectorRegistry()
    ProcessCollector(registry=r)
    PlatformCollector(registry=r)
    GCCollector(registry=r)
    return r


class MetricsServer:
    """The ``/metrics`` HTTP endpoint of one registry (a daemon thread); :meth:`stop` closes it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._server: Any = None
        self.port: int | None = None

    def start(self, cfg: MetricsConfig, *, service: str, file: str | None = None) -> int | None:
        """Serve as ``cfg`` says; returns the bound port (None when not served).

        A port that cannot be bound is a configuration error naming the file and key.
        """
        if cfg.port is None:
            return None
        try:
            server, _thread = start_http_server(cfg.port, addr=cfg.host, registry=self.registry)
        except OSError as exc:
            from fedline.config import ConfigError

            raise ConfigError(file, "metrics.port", f"cannot serve /metrics on {cfg.host}:{cfg.port}: {exc}") from None
        self._server = server
        self.port = int(server.server_address[1])
        event(log, "metrics.serving", service=service, url=f"http://{cfg.host}:{self.port}/metrics")
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
