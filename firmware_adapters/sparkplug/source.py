"""A Sparkplug B reader: decode NBIRTH / DBIRTH / NDATA / DDATA into samples.

What the specification asks of a consumer, and what this does:

- **Aliases.** BIRTH messages name each metric and may give it a numeric alias;
  later DATA messages may carry only the alias. The reader keeps one alias
  table per edge node (aliases are unique across a node and its devices),
  replaced on every NBIRTH, and the datatype of each metric (needed to decode
  signed integers).
- **Sequence numbers.** Every message of an edge node except NDEATH carries
  ``seq`` 0..255, one more than the last (wrapping). A gap means lost
  messages: it is counted (``gaps``, ``skipped``) and the reader asks the node
  for a rebirth (an NCMD with ``Node Control/Rebirth = true``), at most once per
  ``rebirth_min_interval_s`` per node. DATA from a node whose BIRTH was not
  seen (the reader started late), or with an unknown alias, also triggers a
  rebirth request and is a counted bad sample.
- **Clean session.** A Sparkplug consumer must not use a persistent session,
  so the reader connects with clean start and a zero session expiry; it
  resubscribes on every reconnect (the broker_bridge client does that).

Each decoded message yields one :class:`Sample` with ``source``
``"<name>/<group>/<node>"`` or ``"<name>/<group>/<node>/<device>"`` and metric
names as tags (``bdSeq`` and ``Node Control/*`` are left out). NDEATH and
DDEATH yield a bad sample; a payload that does not decode is a counted bad
sample and never stops the reader.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedline.config import resolve_path
from fedline.logs import event
from firmware_adapters.config import SparkplugConfig
from firmware_adapters.sample import Sample, SourceStats, Value
from firmware_adapters.sparkplug import sparkplug_b_pb2 as pb
from firmware_adapters.sparkplug.codec import (
    BDSEQ_METRIC,
    NAMESPACE,
    Unsupported,
    metric_value,
    parse_topic,
    rebirth_command,
)

log = logging.getLogger("fedline.adapters.sparkplug")

_SEQ_TYPES = {"NBIRTH", "DBIRTH", "NDATA", "DDATA", "DDEATH"}


@dataclass
class NodeState:
    """What the reader knows of one edge node since its last NBIRTH."""

    born: bool = False
    seq: int | None = None
    aliases: dict[int, str] = field(default_factory=dict)
    datatypes: dict[str, int] = field(default_factory=dict)  # metric (device/name) -> datatype
    last_rebirth_request: float = float("-inf")


class SparkplugSource:
    """``async for sample in SparkplugSource(cfg)``; see the module docstring."""

    def __init__(self, cfg: SparkplugConfig, file: str | Path | None = None) -> None:
        self.cfg = cfg
        self.file = file
        self.name = cfg.source_name
        self.stats = SourceStats()
        self.nodes: dict[tuple[str, str], NodeState] = {}
        self.ready = asyncio.Event()  # set once connected and subscribed
        self._client: Any = None

    def _settings(self) -> Any:
        from broker_bridge.client import BrokerSettings

        return BrokerSettings(
            url=self.cfg.url,
            client_id=self.cfg.client_id or f"fedline-sparkplug-{uuid.uuid4().hex[:8]}",
            username=self.cfg.username, password=self.cfg.password,
            ca_file=str(resolve_path(self.file, self.cfg.ca_file)) if self.cfg.ca_file else None,
            protocol="5", clean_start=True, session_expiry_s=0,  # the spec forbids persistent sessions
            keepalive_s=self.cfg.keepalive_s,
            backoff_min_s=self.cfg.reconnect_initial_s, backoff_max_s=self.cfg.reconnect_max_s,
            timeout_s=10.0,
        )

    def filters(self) -> list[str]:
        g, n = self.cfg.group_id, self.cfg.edge_node_id
        return [f"{NAMESPACE}/{g}/+/{n}", f"{NAMESPACE}/{g}/+/{n}/+"]

    async def __aiter__(self) -> AsyncIterator[Sample]:
        from broker_bridge.client import MqttClient

        async with MqttClient(self._settings()) as client:
            self._client = client
            for f in self.filters():
                await client.subscribe(f, qos=0)
            last_connects = 0
            watcher = asyncio.create_task(self._watch_connection(client))
            try:
                async for msg in client.messages():
                    if client.stats.connects != last_connects:
                        if last_connects:
                            self.stats.reconnects += 1
                            self.stats.gaps += 1
                            # messages were lost while away: each node's sequence restarts from its next message
                            for state in self.nodes.values():
                                state.seq = None
                        last_connects = client.stats.connects
                    for sample in await self.handle(msg.topic, msg.payload):
                        yield sample
            finally:
                watcher.cancel()
                self._client = None
                self.ready.clear()

    async def _watch_connection(self, client: Any) -> None:
        while True:
            await client.connected.wait()
            self.ready.set()
            while client.connected.is_set():
                await asyncio.sleep(0.1)
            self.ready.clear()

    # ------------------------------------------------------------ decoding

    async def handle(self, topic: str, payload: bytes) -> list[Sample]:
        """Decode one message into zero or more samples (public for tests and replays)."""
        parsed = parse_topic(topic)
        if parsed is None:
            return []
        group, mtype, node, device = parsed
        src = f"{self.name}/{group}/{node}" + (f"/{device}" if device else "")
        try:
            p = pb.Payload.FromString(payload)
        except Exception as exc:  # protobuf's DecodeError and friends
            self.stats.bad_reads += 1
            return [Sample.bad(src, f"undecodable {mtype} payload: {type(exc).__name__}")]
        state = self.nodes.setdefault((group, node), NodeState())
        out: list[Sample] = []
        if mtype == "NBIRTH":
            self.nodes[(group, node)] = state = NodeState(last_rebirth_request=state.last_rebirth_request)
            state.born = True
            state.seq = p.seq if p.HasField("seq") else None
        elif mtype in _SEQ_TYPES:
            if not self._check_seq(state, p, src):
                await self._request_rebirth(group, node, state, "sequence gap")
        if mtype == "NDEATH":
            state.born = False
            state.seq = None
            return [Sample.bad(src, "NDEATH: edge node offline")]
        if mtype == "DDEATH":
            return [Sample.bad(src, "DDEATH: device offline")]
        if mtype not in ("NBIRTH", "DBIRTH", "NDATA", "DDATA"):
            return []  # NCMD / DCMD / STATE are not telemetry
        if not state.born:
            self.stats.bad_reads += 1
            await self._request_rebirth(group, node, state, f"{mtype} before NBIRTH")
            return [Sample.bad(src, f"{mtype} from a node whose NBIRTH was not seen")]
        birth = mtype.endswith("BIRTH")
        values: dict[str, Value] = {}
        unknown = 0
        bad_names = 0
        for m in p.metrics:
            name = m.name if m.HasField("name") else None
            if isinstance(name, bytes):  # not UTF-8: protobuf hands back bytes; the spec requires UTF-8
                bad_names += 1
                continue
            if birth:
                if name is None:
                    unknown += 1
                    continue
                if m.HasField("alias"):
                    state.aliases[m.alias] = name
                state.datatypes[f"{device}/{name}"] = m.datatype
            elif name is None:
                name = state.aliases.get(m.alias) if m.HasField("alias") else None
                if name is None:
                    unknown += 1
                    continue
            if name == BDSEQ_METRIC or name.startswith("Node Control/"):
                continue
            datatype = m.datatype if m.HasField("datatype") else state.datatypes.get(f"{device}/{name}", 0)
            try:
                values[name] = metric_value(m, datatype)
            except Unsupported:
                self.stats.bump("unsupported_metrics")
        ts = p.timestamp / 1000.0 if p.HasField("timestamp") else time.time()
        if unknown:
            self.stats.bad_reads += 1
            await self._request_rebirth(group, node, state, "unknown alias")
            out.append(Sample.bad(src, f"{unknown} metric(s) with no name and an unknown alias", ts))
        if bad_names:
            self.stats.bad_reads += 1
            self.stats.bump("bad_metric_names", bad_names)
            out.append(Sample.bad(src, f"{bad_names} metric name(s) that are not UTF-8 were ignored", ts))
        if values:
            self.stats.reads += 1
            out.append(Sample(ts=ts, source=src, values=values))
        return out

    def _check_seq(self, state: NodeState, p: Any, src: str) -> bool:
        if not p.HasField("seq"):
            return True
        seq = p.seq % 256
        if state.seq is None:
            state.seq = seq
            return True
        expected = (state.seq + 1) % 256
        state.seq = seq
        if seq == expected:
            return True
        self.stats.gaps += 1
        self.stats.skipped += (seq - expected) % 256
        event(log, "sparkplug.seq_gap", logging.WARNING, source=src, expected=expected, got=seq)
        return False

    async def _request_rebirth(self, group: str, node: str, state: NodeState, why: str) -> None:
        if not self.cfg.request_rebirth or self._client is None:
            return
        now = time.monotonic()
        if now - state.last_rebirth_request < self.cfg.rebirth_min_interval_s:
            return
        state.last_rebirth_request = now
        topic = f"{NAMESPACE}/{group}/NCMD/{node}"
        try:
            await self._client.publish(topic, rebirth_command(), qos=0, timeout=2.0)
        except Exception as exc:  # NotConnected / PublishRefused: try again on the next trigger
            event(log, "sparkplug.rebirth_failed", logging.WARNING, topic=topic, error=repr(exc))
            state.last_rebirth_request = float("-inf")
            return
        self.stats.bump("rebirth_requests")
        event(log, "sparkplug.rebirth_requested", group=group, node=node, reason=why)
