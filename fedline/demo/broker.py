"""The demo's broker phase: a private Mosquitto, the embedded amqtt broker, or an existing one.

Why a phase of its own: which broker runs decides the MQTT version every
generated file speaks, whether TLS and the generated ACL apply, and how the
demo stops it; the runner only needs where it is and one sentence for the
report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedline.demo.runner import DemoOptions
    from fedline.demo.workspace import Workspace


@dataclass
class DemoBroker:
    """Where the demo's parties meet (``host:port``, ``protocol``), and what the report says of it."""

    host: str
    port: int
    protocol: str
    description: str
    _mosquitto: Any = None
    _embedded: Any = None

    @classmethod
    async def start(cls, opts: DemoOptions, ws: Workspace, sites: list[str]) -> DemoBroker:
        """``--broker URL`` if given, else a private Mosquitto (TLS, generated ACL), else amqtt (3.1.1, no ACL)."""
        from broker_bridge.mosquitto import MosquittoProcess, free_port, mosquitto_binary

        # writes conf, ACL, passwords and a CA; client ids are bound to usernames, as in production
        mosq = MosquittoProcess(ws.broker_dir, federation=ws.federation, sites=sites, bind_client_ids=True)
        if opts.broker:
            from urllib.parse import urlparse

            u = urlparse(opts.broker)
            return cls(
                u.hostname or "127.0.0.1",
                u.port or 1883,
                opts.protocol,
                f"an existing broker at {opts.broker} (MQTT {opts.protocol}; its own ACL and users: the "
                "demo's generated credentials are sent)",
            )
        if mosquitto_binary() and not opts.embedded:
            mosq.start()
            ws.ca_file, ws.line_users = mosq.ca_file, True
            return cls(
                "127.0.0.1",
                mosq.tls_port,
                "5",
                f"a private Mosquitto ({mosquitto_binary()}) on 127.0.0.1:{mosq.tls_port} (TLS) with the generated "
                f"config, CA, ACL and password file in {ws.broker_dir}",
                _mosquitto=mosq,
            )
        from broker_bridge.embedded import EmbeddedBroker

        port = free_port()
        embedded = await EmbeddedBroker("127.0.0.1", port).start()
        # amqtt logs its own QoS 1 retries to slow subscribers as tracebacks; delivery is checked end to end
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
        return cls(
            "127.0.0.1",
            port,
            "3.1.1",
            f"the embedded amqtt broker on 127.0.0.1:{port} (MQTT 3.1.1, no ACL: "
            + ("--embedded was given" if opts.embedded else "mosquitto is not installed")
            + ")",
            _embedded=embedded,
        )

    async def stop(self) -> None:
        """Stop what the demo started (an existing broker is left alone)."""
        if self._mosquitto is not None:
            self._mosquitto.stop()
        if self._embedded is not None:
            await self._embedded.stop()
