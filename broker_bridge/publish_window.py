"""QoS 1 publishes that leave in order without waiting for each other's acknowledgement: the one home of it.

Why: a PUBACK is a round trip through the broker and back through the publisher's event loop, which also reads
everything the party receives. Awaited one after another, they were the aggregator decider's ceiling (its receipts;
BENCHMARKS.md, "Why the backlog grew at about 64 updates/s") and the pace of a secure-aggregation cohort's
messages at both ends. Here a message is handed to the connection in the order :meth:`PublishWindow.publish` was
called, and its acknowledgement is awaited by a task of its own; at most ``limit`` are outstanding (handed and not
acknowledged, or waiting for a connection), beyond which the caller waits for one (back-pressure from a slow
broker).

Ordering: every message is handed to paho in call order (paho sends in that order and the broker keeps one client's
order), also across a lost connection: while there is none, messages queue here and one task hands them, in order,
once it is back. So a retained announcement and its later clearing on the same topic reach the broker in that order.

Nothing is dropped silently: a message is either acknowledged or counted in :attr:`PublishWindow.failed` and
reported through ``on_failure`` (refused by the broker, no connection within the client's timeout, not acknowledged,
or still outstanding when :meth:`PublishWindow.drain` gives up at a stop). What a failure means is the owner's: a
receipt comes again from the store when its site resends, a cohort message's cohort fails cleanly at its deadline.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from broker_bridge.client import MqttClient
from broker_bridge.errors import FedlineError, NotConnected

log = logging.getLogger("fedline.mqtt")

IN_FLIGHT = 1024  # outstanding publishes at most (the caller waits beyond)


@dataclass(frozen=True)
class _Message:
    client: MqttClient
    topic: str
    payload: bytes
    qos: int
    retain: bool
    what: str


class PublishWindow:
    """Publishes started in call order, acknowledged concurrently, at most ``limit`` outstanding.

    ``on_failure(topic, what, error)`` is called once for every message that was not acknowledged (``what`` is the
    caller's label for it, e.g. a receipt's site and counter).
    """

    def __init__(
        self, limit: int = IN_FLIGHT, on_failure: Callable[[str, str, BaseException], None] | None = None
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self.on_failure = on_failure
        self._queued: collections.deque[_Message] = collections.deque()  # waiting for a connection, in order
        self._acks: set[asyncio.Task[None]] = set()  # handed, awaiting their acknowledgement
        self._hander: asyncio.Task[None] | None = None
        self._room = asyncio.Event()
        self.started = 0  # publish() calls
        self.acknowledged = 0
        self.failed = 0
        self.peak = 0  # the most outstanding at once

    def __len__(self) -> int:
        """Messages outstanding: queued for a connection, or handed and not acknowledged."""
        return len(self._queued) + len(self._acks)

    async def publish(
        self, client: MqttClient, topic: str, payload: bytes, qos: int = 1, retain: bool = False, what: str = ""
    ) -> None:
        """Start one publish after every one started before it; return without waiting for its acknowledgement
        (only for room, when ``limit`` are outstanding)."""
        while len(self) >= self.limit:
            self._room.clear()
            await self._room.wait()
        self.started += 1
        msg = _Message(client, topic, payload, qos, retain, what)
        if not self._queued and client.connected.is_set():
            self._hand(msg)  # the usual case: handed now, synchronously, so in call order
        else:
            self._queued.append(msg)
            if self._hander is None or self._hander.done():
                self._hander = asyncio.create_task(self._hand_queued(), name="publish-window-hand")
        self.peak = max(self.peak, len(self))

    def _hand(self, msg: _Message) -> None:
        try:
            ack = msg.client.hand_now(msg.topic, msg.payload, msg.qos, msg.retain)
        except FedlineError as exc:
            self._failed(msg, exc)
            return
        self._await(msg, ack)

    def _await(self, msg: _Message, ack: Awaitable[None]) -> None:
        task = asyncio.create_task(self._acknowledgement(msg, ack), name="publish-window-ack")
        self._acks.add(task)
        task.add_done_callback(self._done)

    async def _hand_queued(self) -> None:
        """Hand the queued messages in order, each once a connection is there (or fail it after the timeout)."""
        while self._queued:
            msg = self._queued[0]
            try:
                ack = await msg.client.publish_begun(msg.topic, msg.payload, msg.qos, msg.retain)
            except FedlineError as exc:
                self._queued.popleft()
                self._failed(msg, exc)
                continue
            self._queued.popleft()
            self._await(msg, ack)

    async def _acknowledgement(self, msg: _Message, ack: Awaitable[None]) -> None:
        try:
            await ack
        except asyncio.CancelledError:
            self._failed(msg, NotConnected("not acknowledged before the publisher stopped"))
            raise
        except Exception as exc:  # refused, timed out, connection lost; a bug too: counted, never silent
            self._failed(msg, exc)
            return
        self.acknowledged += 1

    def _done(self, task: asyncio.Task[None]) -> None:
        self._acks.discard(task)
        self._room.set()

    def _failed(self, msg: _Message, exc: BaseException) -> None:
        self.failed += 1
        self._room.set()
        if self.on_failure is not None:
            try:
                self.on_failure(msg.topic, msg.what, exc)
            except Exception:  # a failing report must not lose the count
                log.exception("publish_window.on_failure failed")

    async def drain(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for every outstanding message; fail (count, report) those left. Returns how many."""
        pending = {*self._acks, *([self._hander] if self._hander is not None and not self._hander.done() else [])}
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)
        left = len(self)
        if self._hander is not None and not self._hander.done():
            self._hander.cancel()
        while self._queued:
            self._failed(self._queued.popleft(), NotConnected("no connection before the publisher stopped"))
        for task in list(self._acks):
            task.cancel()  # its own handler counts and reports it
        if self._acks:
            await asyncio.wait(set(self._acks))
        return left
