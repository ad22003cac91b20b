"""An embedded MQTT broker (amqtt) for a laptop without Mosquitto.

It is a stand-in for demos, not a production broker: amqtt speaks MQTT 3.1.1
only (so no PUBACK reason codes: delivery is still confirmed end to end by the
aggregator's signed receipts), enforces no fedline ACL, and queues messages for
offline clients only when they log in with a username and a persistent
session (fedline's clients always do).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("fedline.broker")


def embedded_config(host: str = "127.0.0.1", port: int = 1883) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 1000}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


class EmbeddedBroker:
    """``async with EmbeddedBroker(port=...)``: an amqtt broker on a loopback port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def start(self) -> EmbeddedBroker:
        from amqtt.broker import Broker

        logging.getLogger("amqtt").setLevel(logging.WARNING)
        logging.getLogger("transitions").setLevel(logging.WARNING)
        self._broker = Broker(embedded_config(self.host, self.port))
        await self._broker.start()
        log.warning("embedded broker (amqtt, MQTT 3.1.1, no ACL) listening on %s", self.url)
        return self

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None

    async def __aenter__(self) -> EmbeddedBroker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve_forever(host: str, port: int) -> None:
    async with EmbeddedBroker(host, port):
        await asyncio.Event().wait()
