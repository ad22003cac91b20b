"""A resilient asyncio MQTT client over aiomqtt, for plant networks that fail.

What it adds to aiomqtt, and why:

- **Reconnects forever** with capped exponential backoff and jitter (a flaky
  plant link must not end the agent, and a hundred sites must not reconnect in
  lock-step after a broker restart).
- **Persistent sessions** (MQTT 5 clean start off with a session expiry, or
  3.1.1 clean session off) so QoS 1 messages published while a party was
  offline are kept by the broker; subscriptions are re-made on every connect.
- **PUBACK reason codes are checked**: aiomqtt 2.x ignores them, so a broker
  that refuses a message under MQTT 5 (too large, not authorised) would look
  like success. Here it raises :class:`PublishRefused`. Under 3.1.1 a broker
  acknowledges what it drops, which is why fedline confirms delivery end to
  end with signed receipts, not PUBACKs.
- **Maximum Packet Size**: paho does not enforce the broker's limit; the
  CONNACK's value is kept in :attr:`MqttClient.max_packet_size` and
  :meth:`MqttClient.chunk_limit` sizes chunks under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from broker_bridge.chunking import DEFAULT_MAX_CHUNK, max_payload_for_packet
from broker_bridge.errors import NotConnected, PublishRefused
from fedline.logs import event

log = logging.getLogger("fedline.mqtt")


@dataclass(frozen=True)
class BrokerSettings:
    """How to reach the broker. One ``[broker]`` table in every process's TOML file."""

    url: str = "mqtt://127.0.0.1:1883"  # mqtt://host:port or mqtts://host:port (TLS)
    client_id: str = ""
    username: str | None = None
    password: str | None = None
    password_file: str | None = None  # read the password from a file instead
    protocol: Literal["5", "3.1.1"] = "5"
    clean_start: bool = False  # False: a persistent session that keeps QoS 1 messages while offline
    session_expiry_s: int = 7 * 24 * 3600
    keepalive_s: int = 30
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False  # skip hostname check (test rigs only)
    max_chunk: int = DEFAULT_MAX_CHUNK
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    timeout_s: float = 30.0  # for one publish or subscribe round trip

    def validate(self) -> None:
        u = urlparse(self.url)
        if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not u.hostname:
            raise ValueError(f"url {self.url!r} must look like mqtt://host:port or mqtts://host:port")
        if self.max_chunk < 1024:
            raise ValueError(f"max_chunk {self.max_chunk} is too small (at least 1024 bytes)")
        if self.backoff_min_s <= 0 or self.backoff_max_s < self.backoff_min_s:
            raise ValueError("backoff_min_s must be > 0 and <= backoff_max_s")

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or "127.0.0.1"

    @property
    def tls(self) -> bool:
        return urlparse(self.url).scheme in ("mqtts", "ssl")

    @property
    def port(self) -> int:
        return urlparse(self.url).port or (8883 if self.tls else 1883)

    @classmethod
    def from_table(
        cls, table: dict[str, Any], file: str | Path | None, where: str = "broker", **defaults: Any
    ) -> BrokerSettings:
        """Settings from a TOML table, relative paths resolved against ``file``'s folder.

        The one parser of broker tables (``[broker]``, and the MQTT keys of a
        ``sparkplug`` / ``mqtt_json`` source): unknown keys, wrong types and
        an invalid URL raise :class:`fedline.config.ConfigError` naming
        ``file`` and the dotted key. ``defaults`` apply where the table is silent.
        """
        from fedline.config import ConfigError, parse, resolve_path

        try:
            s = parse(cls, {**defaults, **table}, file=file, where=where)  # runs validate()
        except ConfigError as exc:
            key = exc.message.split(" ", 1)[0]
            if exc.key == where and key in table:  # name the key validate() complains about
                raise ConfigError(file, f"{where}.{key}", exc.message) from None
            raise
        if (s.cert_file is None) != (s.key_file is None):
            raise ConfigError(
                file,
                f"{where}.{'key_file' if s.key_file is None else 'cert_file'}",
                "a client certificate needs both cert_file and key_file",
            )
        tls_keys = [k for k in ("ca_file", "cert_file", "key_file", "tls_insecure") if table.get(k)]
        if tls_keys and not s.tls:
            raise ConfigError(
                file,
                f"{where}.{tls_keys[0]}",
                f"{tls_keys[0]} is set but url {s.url!r} is not TLS: use mqtts://host:8883",
            )
        paths: dict[str, Any] = {k: str(resolve_path(file, v)) for k in _PATH_KEYS if (v := getattr(s, k))}
        return dataclasses.replace(s, **paths)

    def resolved_password(self) -> str | None:
        if self.password_file:
            with open(self.password_file, encoding="utf-8") as fh:
                return fh.read().strip()
        return self.password


_PATH_KEYS = ("password_file", "ca_file", "cert_file", "key_file")


@dataclass(frozen=True)
class Message:
    """One received message."""

    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 0


@dataclass
class ClientStats:
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    published: int = 0
    refused: int = 0
    received: int = 0


class _CheckedClient(aiomqtt.Client):
    """aiomqtt.Client that keeps PUBACK reason codes and the CONNACK's limits."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # aiomqtt warns on every publish beyond 10 awaiting their acknowledgement; broker_bridge.publish_window
        # keeps up to 1,024 in flight on purpose (a FedBuff flush's receipts, a cohort's messages)
        self.pending_calls_threshold = 4096
        self.publish_codes: dict[int, ReasonCode] = {}
        self.max_packet_size: int | None = None
        self.session_present = False

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        if properties is not None and hasattr(properties, "MaximumPacketSize"):
            self.max_packet_size = int(properties.MaximumPacketSize)
        self.session_present = bool(getattr(flags, "session_present", False))
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Properties
    ) -> None:
        self.publish_codes[mid] = reason_code
        super()._on_publish(client, userdata, mid, reason_code, properties)

    def hand(self, topic: str, payload: bytes, qos: int, retain: bool) -> paho.MQTTMessageInfo:
        """Give the message to paho now (synchronous): messages handed one after another leave in that order."""
        info = self._client.publish(topic, payload, qos, retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        return info

    async def acknowledged(self, info: paho.MQTTMessageInfo, topic: str, timeout: float) -> None:
        """Wait for a handed message's acknowledgement; raise PublishRefused on a failure code."""
        if not info.is_published():
            done = asyncio.Event()
            with self._pending_call(info.mid, done, self._pending_publishes):
                await self._wait_for(done.wait(), timeout=timeout)
        code = self.publish_codes.pop(info.mid, None)
        if code is not None and code.is_failure:
            raise PublishRefused(int(code.value), str(code), topic)


class MqttClient:
    """One connection to the broker that comes back by itself.

    Use as ``async with MqttClient(settings) as client:``. The connection runs
    in a background task; :meth:`publish` waits (up to ``timeout``) for it.
    ``on_connect`` callbacks run after every (re)connect, e.g. to publish an
    ``online`` status. ``will`` may be a function, called before every
    connection attempt, for a last will that changes per connection (a
    Sparkplug Host Application's STATE carries the connection's timestamp).
    """

    def __init__(
        self,
        settings: BrokerSettings,
        will: aiomqtt.Will | Callable[[], aiomqtt.Will] | None = None,
        on_connect: Callable[[MqttClient], Awaitable[None]] | None = None,
        queue_size: int = 10000,
    ) -> None:
        settings.validate()
        self.settings = settings
        self.will = will
        self.on_connect = on_connect
        self.connected = asyncio.Event()
        self._callbacks: set[asyncio.Task[None]] = set()  # on_connect runs; kept so they are not collected
        self.stats = ClientStats()
        self.max_packet_size: int | None = None
        self.last_error: str | None = None
        self._subs: dict[str, int] = {}
        self._retain_as_published: set[str] = set()
        self._queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=queue_size)
        self._client: _CheckedClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle -------------------------------------------------------------
    async def __aenter__(self) -> MqttClient:
        self._closing = False
        self._task = asyncio.create_task(self._run(), name=f"mqtt:{self.settings.client_id}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (the broker does not send the last will), within ``timeout`` seconds.

        aiomqtt waits for the broker to close the connection after DISCONNECT,
        up to the whole operation timeout; a process that is shutting down must
        not hang on a slow or vanished broker, so after ``timeout`` the
        connection is treated as closed.
        """
        self._closing = True
        task = self._task
        if task is not None:
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                client = self._client
                if client is not None and not client._disconnected.done():
                    client._disconnected.set_result(None)
                    with contextlib.suppress(Exception):
                        client._client.disconnect()
                await asyncio.wait({task}, timeout=timeout)
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a failing connection loop is not an error at close
            self._task = None
        self.connected.clear()

    def _make_client(self) -> _CheckedClient:
        s = self.settings
        v5 = s.protocol == "5"
        props = None
        kwargs: dict[str, Any] = {}
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0 if s.clean_start else s.session_expiry_s
            kwargs["clean_start"] = s.clean_start
        else:
            kwargs["clean_session"] = s.clean_start
        tls_params = None
        if s.tls:
            tls_params = aiomqtt.TLSParameters(
                ca_certs=s.ca_file,
                certfile=s.cert_file,
                keyfile=s.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        return _CheckedClient(
            s.host,
            s.port,
            identifier=s.client_id or None,
            username=s.username,
            password=s.resolved_password(),
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            will=self.will() if callable(self.will) else self.will,
            keepalive=s.keepalive_s,
            timeout=s.timeout_s,
            properties=props,
            tls_params=tls_params,
            tls_insecure=s.tls_insecure if s.tls else None,
            max_inflight_messages=64,
            **kwargs,
        )

    async def _run(self) -> None:
        delay = self.settings.backoff_min_s
        while not self._closing:
            client = self._make_client()
            try:
                async with client:
                    self._client = client
                    self.max_packet_size = client.max_packet_size
                    self.stats.connects += 1
                    delay = self.settings.backoff_min_s
                    for flt, qos in list(self._subs.items()):
                        _check_suback(flt, await client.subscribe(flt, **self._sub_options(flt, qos)))
                    event(
                        log,
                        "mqtt.connected",
                        url=self.settings.url,
                        client=self.settings.client_id,
                        session_present=client.session_present,
                        max_packet=client.max_packet_size,
                    )
                    self.connected.set()
                    if self.on_connect is not None:
                        task = asyncio.create_task(self._call_on_connect())
                        self._callbacks.add(task)
                        task.add_done_callback(self._callbacks.discard)
                    async for m in client.messages:
                        self.stats.received += 1
                        payload = (
                            m.payload
                            if isinstance(m.payload, (bytes, bytearray))
                            else (str(m.payload).encode() if m.payload is not None else b"")
                        )
                        await self._queue.put(Message(str(m.topic), bytes(payload), bool(m.retain), int(m.qos)))
            except asyncio.CancelledError:
                self.connected.clear()
                self._client = None
                raise
            except Exception as exc:  # aiomqtt.MqttError, OSError, refused CONNACK ...
                self.last_error = f"{type(exc).__name__}: {exc}"
                if self.connected.is_set():
                    self.stats.disconnects += 1
                    event(
                        log,
                        "mqtt.disconnected",
                        level=logging.WARNING,
                        client=self.settings.client_id,
                        error=self.last_error,
                    )
                else:
                    self.stats.connect_failures += 1
                    event(
                        log,
                        "mqtt.connect_failed",
                        level=logging.DEBUG,
                        client=self.settings.client_id,
                        error=self.last_error,
                    )
            self.connected.clear()
            self._client = None
            if self._closing:
                break
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.settings.backoff_max_s)

    async def _call_on_connect(self) -> None:
        try:
            assert self.on_connect is not None
            await self.on_connect(self)
        except Exception as exc:  # a failing hook must not kill the connection loop
            event(log, "mqtt.on_connect_failed", level=logging.WARNING, error=repr(exc))

    # -- operations --------------------------------------------------------------
    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until connected; :class:`NotConnected` after ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
        except TimeoutError:
            raise NotConnected(
                f"no connection to {self.settings.url} within {timeout} s"
                + (f" (last error: {self.last_error})" if self.last_error else "")
            ) from None

    def _sub_options(self, topic_filter: str, qos: int) -> dict[str, Any]:
        """MQTT 5 subscription options: retain-as-published where asked (so a live retained message shows)."""
        if topic_filter not in self._retain_as_published or self.settings.protocol != "5":
            return {"qos": qos}
        from paho.mqtt.subscribeoptions import SubscribeOptions

        return {"qos": 0, "options": SubscribeOptions(qos=qos, retainAsPublished=True)}

    async def subscribe(self, topic_filter: str, qos: int = 1, retain_as_published: bool = False) -> None:
        """Subscribe now if connected, and again after every reconnect.

        ``retain_as_published`` (MQTT 5): a message published retained keeps its
        retain flag when forwarded live, so the aggregator can see (and clear) a
        retained update; under 3.1.1 only the retained copy delivered on
        (re)subscribe carries the flag.
        """
        self._subs[topic_filter] = qos
        if retain_as_published:
            self._retain_as_published.add(topic_filter)
        client = self._client
        if client is not None and self.connected.is_set():
            try:
                granted = await client.subscribe(topic_filter, **self._sub_options(topic_filter, qos))
            except aiomqtt.MqttError:
                return  # the reconnect loop re-subscribes
            _check_suback(topic_filter, granted)

    async def unsubscribe(self, topic_filter: str) -> None:
        """Stop receiving ``topic_filter`` now if connected, and do not subscribe to it again on reconnect."""
        self._subs.pop(topic_filter, None)
        self._retain_as_published.discard(topic_filter)
        client = self._client
        if client is not None and self.connected.is_set():
            with contextlib.suppress(aiomqtt.MqttError):  # a reconnect makes only the subscriptions left
                await client.unsubscribe(topic_filter)

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float | None = None
    ) -> None:
        """Publish once. Waits for a connection up to ``timeout`` (default settings.timeout_s).

        Raises :class:`PublishRefused` when the broker refuses it (MQTT 5) and
        :class:`NotConnected` when no connection or acknowledgement came in time.
        """
        await (await self.publish_begun(topic, payload, qos, retain, timeout))

    async def publish_begun(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float | None = None
    ) -> Awaitable[None]:
        """Hand one message to the connection (waiting for one up to ``timeout``) and return, unawaited, the wait
        for its acknowledgement (which raises as :meth:`publish` does; it must be awaited).

        Messages handed by calls made one after another leave in that order, whatever order their
        acknowledgements are awaited in: :class:`broker_bridge.publish_window.PublishWindow` rests on that.
        Raises :class:`NotConnected` or :class:`PublishRefused` when the message could not be handed.
        """
        timeout = self.settings.timeout_s if timeout is None else timeout
        if not self.connected.is_set():
            await self.wait_connected(timeout)
        return self.hand_now(topic, payload, qos, retain, timeout)

    def hand_now(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float | None = None
    ) -> Awaitable[None]:
        """:meth:`publish_begun` without waiting for a connection: :class:`NotConnected` at once without one."""
        timeout = self.settings.timeout_s if timeout is None else timeout
        client = self._client
        if client is None or not self.connected.is_set():
            raise NotConnected("connection dropped before publishing")
        size = publish_packet_size(topic, len(payload), qos, self.settings.protocol == "5")
        if self.max_packet_size and size > self.max_packet_size:
            # paho would send it and the broker would drop the whole connection (0x95): refuse here
            self.stats.refused += 1
            raise PublishRefused(0x95, f"Packet too large ({size} > broker maximum {self.max_packet_size})", topic)
        try:
            info = client.hand(topic, payload, qos, retain)
        except aiomqtt.MqttError as exc:
            raise NotConnected(f"publish to {topic!r} not handed to the connection: {exc}") from None
        return self._acknowledged(client, info, topic, timeout)

    async def _acknowledged(
        self, client: _CheckedClient, info: paho.MQTTMessageInfo, topic: str, timeout: float
    ) -> None:
        try:
            await client.acknowledged(info, topic, timeout)
        except PublishRefused:
            self.stats.refused += 1
            raise
        except aiomqtt.MqttError as exc:
            raise NotConnected(f"publish to {topic!r} not acknowledged: {exc}") from None
        self.stats.published += 1

    async def publish_many(
        self,
        items: list[tuple[str, bytes]],
        qos: int = 1,
        retain: bool = False,
        timeout: float | None = None,
        window: int = 32,
    ) -> None:
        """Publish several messages with up to ``window`` in flight; all must be acknowledged."""
        sem = asyncio.Semaphore(window)

        async def one(topic: str, payload: bytes) -> None:
            async with sem:
                await self.publish(topic, payload, qos, retain, timeout)

        await asyncio.gather(*(one(t, p) for t, p in items))

    def chunk_limit(self, topic: str) -> int:
        """Largest chunk for ``topic``: the configured size, or less if the broker's packet limit says so."""
        limit = self.settings.max_chunk
        if self.max_packet_size:
            limit = min(limit, max_payload_for_packet(self.max_packet_size, topic))
        return limit

    async def messages(self) -> AsyncIterator[Message]:
        """Every message received on any subscription, across reconnects."""
        while True:
            yield await self._queue.get()

    def get_nowait(self) -> Message | None:
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None


def publish_packet_size(topic: str, payload_len: int, qos: int, v5: bool) -> int:
    """Bytes of a PUBLISH packet without properties: what a broker's Maximum Packet Size limits."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + (1 if v5 else 0) + payload_len
    varint = 1 if remaining < 128 else 2 if remaining < 16384 else 3 if remaining < 2097152 else 4
    return 1 + varint + remaining


def _check_suback(topic_filter: str, granted: object) -> None:
    """Log a subscription the broker refused (SUBACK code >= 0x80): it would otherwise look granted."""
    for code in granted if isinstance(granted, (list, tuple)) else ():
        value = int(getattr(code, "value", code) or 0)
        if value >= 0x80:
            event(
                log,
                "mqtt.subscribe_refused",
                level=logging.ERROR,
                topic=topic_filter,
                reason=str(code),
                code=f"0x{value:02x}",
            )


def will_message(topic: str, payload: bytes, retain: bool = True, qos: int = 1) -> aiomqtt.Will:
    """The last will the broker publishes if a party vanishes (e.g. status ``offline``)."""
    return aiomqtt.Will(topic, payload, qos, retain)


__all__ = ["BrokerSettings", "ClientStats", "Message", "MqttClient", "will_message"]
