"""OPC UA source (asyncua): subscribe to nodes and yield a sample per data change.

Nodes are given by node id (``ns=2;s=Line1.Temperature``) or by a browse path
from the Objects folder (``2:Line1/2:Temperature``), which survives a server
that renumbers its numeric node ids. The server samples at
``sampling_interval_ms`` and publishes at ``publishing_interval_ms``; each
change arrives as one :class:`Sample` with the server's source timestamp and
the OPC UA status mapped to ``quality`` (Good / Uncertain / Bad).

Security: ``security_mode`` is SignAndEncrypt unless the table asks for Sign
or, explicitly, None; signing needs the client's certificate and private key
(``fedline opcua-cert``, see :mod:`firmware_adapters.opcua_cert`) and a
``security_policy``; ``server_certificate`` pins the server's certificate
(without it the server's certificate is taken from its unsecured endpoint
list on first contact). The client announces the application URI written in
its certificate, as servers check. ``username``/``password`` authenticate the
user. A lost session (server restart, network) yields one bad
sample, counts a gap, and reconnects with backoff, re-creating the
subscription; a node that cannot be resolved is a counted bad sample, and the
other nodes are still subscribed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC
from pathlib import Path
from typing import Any

from fedline.config import resolve_path
from fedline.logs import event
from firmware_adapters.backoff import Backoff
from firmware_adapters.config import OpcUaConfig
from firmware_adapters.sample import Quality, Sample, SourceStats

log = logging.getLogger("fedline.adapters.opcua")


class _Handler:
    """asyncua subscription handler: turns data changes into samples on a queue."""

    def __init__(self, source: OpcUaSource, queue: asyncio.Queue[Sample], tags: dict[str, str]) -> None:
        self.source = source
        self.queue = queue
        self.tags = tags  # node id string -> tag name

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        tag = self.tags.get(node.nodeid.to_string(), node.nodeid.to_string())
        dv = data.monitored_item.Value
        ts = time.time()
        stamp = dv.SourceTimestamp or dv.ServerTimestamp
        if stamp is not None:
            ts = (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()
        status = dv.StatusCode_ if hasattr(dv, "StatusCode_") else dv.StatusCode
        quality: Quality
        if status is None or status.is_good():
            quality, error = "good", None
        elif status.is_uncertain():
            quality, error = "uncertain", status.name
        else:
            quality, error, val = "bad", status.name, None
        if isinstance(val, (list, tuple, bytes, dict)) or (
            val is not None and not isinstance(val, (bool, int, float, str))
        ):
            quality, error, val = "bad", f"unsupported value type {type(val).__name__}", None
        sample = Sample(ts=ts, source=self.source.name, values={tag: val}, quality=quality, error=error)
        try:
            self.queue.put_nowait(sample)
        except asyncio.QueueFull:
            self.source.stats.skipped += 1

    def status_change_notification(self, status: Any) -> None:
        event(log, "opcua.status_change", logging.WARNING, source=self.source.name, status=str(status))


class OpcUaSource:
    """``async for sample in OpcUaSource(cfg, file=...)``; see the module docstring."""

    def __init__(self, cfg: OpcUaConfig, file: str | Path | None = None) -> None:
        self.cfg = cfg
        self.file = file
        self.name = cfg.source_name
        self.stats = SourceStats()

    async def _client(self) -> Any:
        from asyncua import Client

        client = Client(self.cfg.url, timeout=self.cfg.timeout_s)
        if self.cfg.security_mode != "None":
            from firmware_adapters.opcua_cert import application_uri_of

            cert = resolve_path(self.file, self.cfg.certificate or "")
            uri = application_uri_of(await asyncio.to_thread(cert.read_bytes))
            if uri:
                client.application_uri = uri
            parts = [
                self.cfg.security_policy,
                self.cfg.security_mode,
                str(resolve_path(self.file, self.cfg.certificate or "")),
                str(resolve_path(self.file, self.cfg.private_key or "")),
            ]
            if self.cfg.server_certificate:
                parts.append(str(resolve_path(self.file, self.cfg.server_certificate)))
            await client.set_security_string(",".join(parts))
        if self.cfg.username is not None:
            client.set_user(self.cfg.username)
        if self.cfg.password is not None:
            client.set_password(self.cfg.password)
        return client

    async def _resolve(self, client: Any) -> tuple[list[Any], dict[str, str], list[str]]:
        nodes, tags, errors = [], {}, []
        for spec in self.cfg.nodes:
            try:
                if spec.node_id is not None:
                    node = client.get_node(spec.node_id)
                    await node.read_browse_name()  # fails now, not silently later, for an unknown id
                else:
                    node = await client.nodes.objects.get_child([p for p in (spec.browse_path or "").split("/") if p])
            except Exception as exc:  # asyncua raises UaStatusCodeError subclasses per status
                errors.append(f"node {spec.tag!r}: {type(exc).__name__}: {exc}")
                continue
            nodes.append(node)
            tags[node.nodeid.to_string()] = spec.tag
        return nodes, tags, errors

    async def __aiter__(self) -> AsyncIterator[Sample]:
        backoff = Backoff(self.cfg.reconnect_initial_s, self.cfg.reconnect_max_s)
        queue: asyncio.Queue[Sample] = asyncio.Queue(maxsize=10000)
        down = False
        while True:
            client = None
            try:
                client = await self._client()
                await client.connect()
                nodes, tags, errors = await self._resolve(client)
                for err in errors:
                    self.stats.bad_reads += 1
                    yield Sample.bad(self.name, err)
                if nodes:
                    sub = await client.create_subscription(self.cfg.publishing_interval_ms, _Handler(self, queue, tags))
                    results = await sub.subscribe_data_change(nodes, sampling_interval=self.cfg.sampling_interval_ms)
                    for node, res in zip(nodes, results if isinstance(results, list) else [results]):
                        if not isinstance(res, int):
                            self.stats.bad_reads += 1
                            yield Sample.bad(self.name, f"cannot monitor {tags[node.nodeid.to_string()]!r}: {res}")
                if down:
                    down = False
                    self.stats.reconnects += 1
                    event(log, "opcua.reconnected", source=self.name)
                backoff.reset()
                while True:
                    try:
                        sample = await asyncio.wait_for(queue.get(), 1.0)
                    except TimeoutError:
                        await client.check_connection()  # raises once the session is gone
                        continue
                    if sample.good:
                        self.stats.reads += 1
                    else:
                        self.stats.bad_reads += 1
                    yield sample
            except Exception as exc:
                from asyncua.ua import UaError

                if not isinstance(exc, (UaError, OSError, asyncio.TimeoutError, ConnectionError)):
                    raise
                event(
                    log, "opcua.session_lost", logging.WARNING, source=self.name, error=f"{type(exc).__name__}: {exc}"
                )
                if not down:
                    down = True
                    self.stats.gaps += 1
                    yield Sample.bad(self.name, f"session lost: {type(exc).__name__}: {exc}")
                await asyncio.sleep(backoff.next())
            finally:
                if client is not None:
                    await self._disconnect(client)

    @staticmethod
    async def _disconnect(client: Any) -> None:
        try:
            await asyncio.wait_for(client.disconnect(), 2.0)
        except Exception:  # the session may already be gone
            pass
