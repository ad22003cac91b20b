"""A small TCP proxy in front of the broker: counts the bytes, and can cut a site off.

Why a proxy and not stopping the agent: cutting the network between a running
edge agent and the broker is what really happens on a plant floor, and it
shows the outbox at work (updates pile up locally, go out on reconnect, and
are settled by receipts) where a restart would only show recovery from disk.
Every party of the demo talks to the broker through one of these, so its
counters are the true bytes on the wire, MQTT framing and redeliveries included.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass


@dataclass
class ProxyStats:
    bytes_up: int = 0  # client -> broker
    bytes_down: int = 0  # broker -> client
    connections: int = 0
    refused: int = 0  # connections turned away while cut

    @property
    def total(self) -> int:
        return self.bytes_up + self.bytes_down


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``upstream_host:upstream_port``.

    ``cut()`` drops every open connection and refuses new ones until
    ``restore()``; clients see a dead link and reconnect with their backoff.
    """

    def __init__(self, upstream_host: str, upstream_port: int, name: str = "", host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.name = name
        self.host = host
        self.port = 0
        self.stats = ProxyStats()
        self.is_cut = False
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def start(self) -> "TcpProxy":
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._drop_all()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    def cut(self) -> None:
        self.is_cut = True
        self._drop_all()

    def restore(self) -> None:
        self.is_cut = False

    def _drop_all(self) -> None:
        for a, b in list(self._conns):
            for w in (a, b):
                with contextlib.suppress(Exception):
                    w.transport.abort()
        self._conns.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut:
            self.stats.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self.stats.connections += 1
        pair = (writer, up_writer)
        self._conns.add(pair)
        try:
            await asyncio.gather(self._pump(reader, up_writer, True), self._pump(up_reader, writer, False))
        finally:
            self._conns.discard(pair)
            for w in pair:
                with contextlib.suppress(Exception):
                    w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.transport.abort()
