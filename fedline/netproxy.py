"""A TCP proxy in front of the broker: counts the bytes on the wire, and can cut a party off.

Used by the demo (every party talks to the broker through one, so its counters
are the true bytes on the wire, MQTT framing included, and cutting one shows
the outbox at work) and by the fault tests. Why a proxy: a network partition is
what really happens on a plant floor, and it must not be simulated by stopping
the agent (that only tests restarts).
Two ways to break the link, because they fail differently:

- ``cut()``: every open connection is reset and new ones are refused (a switch
  port going down, a firewall rejecting): the client sees the error at once;
- ``blackhole()``: connections stay open and new ones are accepted, but no byte
  gets through in either direction (a dead route): the client only finds out
  from its MQTT keep-alive, and its reconnect attempts hang until they time out.

``restore()`` lets traffic through again; black-holed connections are reset
then, as a real TCP stack would eventually do.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass


@dataclass
class ProxyStats:
    bytes_up: int = 0  # site -> broker
    bytes_down: int = 0  # broker -> site
    connections: int = 0
    refused: int = 0  # connections reset while cut
    swallowed: int = 0  # bytes dropped while black-holed

    @property
    def total(self) -> int:
        return self.bytes_up + self.bytes_down


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``upstream``; ``await start()`` first, ``await stop()`` last."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", name: str = "") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.name = name
        self.port = 0
        self.stats = ProxyStats()
        self.mode = "open"  # open | cut | blackhole
        self._server: asyncio.Server | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def is_cut(self) -> bool:
        return self.mode != "open"

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._reset_all()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    def cut(self) -> None:
        """Reset every connection; refuse new ones until :meth:`restore`."""
        self.mode = "cut"
        self._reset_all()

    def blackhole(self) -> None:
        """Keep connections open but let nothing through, until :meth:`restore`."""
        self.mode = "blackhole"

    def restore(self) -> None:
        was = self.mode
        self.mode = "open"
        if was == "blackhole":
            self._reset_all()  # those sessions are dead on both ends by now

    def _reset_all(self) -> None:
        for pair in list(self._conns):
            for w in pair:
                if w is not None:
                    with contextlib.suppress(Exception):
                        w.transport.abort()
        self._conns.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "cut":
            self.stats.refused += 1
            writer.transport.abort()
            return
        if self.mode == "blackhole":  # accept, then swallow everything until restored
            pair0 = (writer, None)
            self._conns.add(pair0)
            try:
                while data := await reader.read(65536):
                    self.stats.swallowed += len(data)
            except (OSError, ConnectionError):
                pass
            finally:
                self._conns.discard(pair0)
                writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:  # the broker is down: the site sees what it would see without us
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
            while data := await reader.read(65536):
                if self.mode == "blackhole":
                    self.stats.swallowed += len(data)
                    continue
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.transport.abort()
