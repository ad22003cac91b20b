"""A Sparkplug B 3.0 reader: NBIRTH / DBIRTH / NDATA / DDATA / NDEATH / DDEATH into samples.

Two roles, chosen by ``host_id`` (Sparkplug 3.0 §5.4 and §5.12-5.13):

- **Passive observer** (no ``host_id``, the default): subscribes and never
  publishes anything — no STATE, no NCMD. Edge nodes waiting for a Primary
  Host never see it, and it cannot make a plant's nodes rebirth. After its own
  reconnect it waits for the nodes' next BIRTH (DATA before that is a counted
  bad sample), because it may not ask for one.
- **Host Application** (``host_id = "..."``): connects with a retained QoS 1
  will ``{"online": false, "timestamp": T}`` on ``spBv1.0/STATE/<host_id>``,
  subscribes, then publishes the retained QoS 1 birth ``{"online": true,
  "timestamp": T}`` with the same ``T`` (a new one per connection, so an edge
  node can tell an old session's late will from the current session); it
  republishes the birth if it sees an offline STATE for its own id, and
  publishes ``{"online": false, "timestamp": now}`` before it disconnects on
  purpose. It may ask nodes for a rebirth (NCMD ``Node Control/Rebirth``) on a
  sequence gap, an unknown alias, DATA before BIRTH, and after its own
  reconnect. ``request_rebirth`` defaults to on only when it reads one group
  and one node: a wildcard reader that asked would rebirth every node of the
  plant at every glitch.

What the reader does with the messages:

- **Aliases and datatypes** come from the BIRTHs (one table per edge node,
  shared with its devices, replaced on every NBIRTH and dropped after the
  reader's own reconnect, when messages may have been missed).
- **Values** are read from the field their datatype allows (see
  :mod:`firmware_adapters.sparkplug.codec`); a metric whose value is in the
  wrong field is reported in a bad sample naming it, never decoded as 0.
- **Timestamps**: a metric's own ``timestamp`` (when its value was captured)
  before the payload's (when the message was sent), before receive time. The
  live metrics of one message are one sample stamped with their newest
  timestamp, so a message is still one row.
- **is_historical** metrics become separate samples with ``historical=True``,
  one per distinct metric timestamp: kept (real data, e.g. store-and-forward
  after an outage) but never mixed with the live state.
- **Quality** property: GOOD metrics are good; STALE ones an "uncertain"
  sample that keeps the values; BAD ones (and codes the specification does
  not define) a "bad" sample whose values are None, as the OPC UA source does.
- **Sequence numbers** (0..255, every message but NDEATH): a gap is counted
  (``gaps``, ``skipped``) and, when rebirth requests are on, asked to rebirth.
- **bdSeq**: an NDEATH kills the node only if its ``bdSeq`` equals the one
  of the node's current NBIRTH; a late NDEATH from a previous session (the
  broker delivers the old connection's will after the node has reconnected)
  is counted as ``stale_ndeath`` and ignored, as Eclipse Tahu's host does.
  NDEATH and DDEATH are stamped with receive time (the will's payload
  timestamp is from the node's connect, §5.6).
- **Clean session**: MQTT 5 clean start with session expiry 0 (or 3.1.1
  clean session), as the specification requires of Host Applications.

``source`` of a sample is ``"<name>/<group>/<node>"`` or
``"<name>/<group>/<node>/<device>"``; metric names are the tags (``bdSeq`` and
``Node Control/*`` are left out). A payload that does not decode is a counted
bad sample and never stops the reader.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedline.logs import event
from firmware_adapters.config import SparkplugConfig
from firmware_adapters.sample import Quality, Sample, SourceStats, Value
from firmware_adapters.sparkplug import sparkplug_b_pb2 as pb
from firmware_adapters.sparkplug.codec import (
    BDSEQ_METRIC,
    NAMESPACE,
    Unsupported,
    WrongField,
    bdseq_of,
    metric_value,
    parse_topic,
    quality_code,
    quality_of,
    rebirth_command,
    state_topic,
    type_name,
)

log = logging.getLogger("fedline.adapters.sparkplug")

_SEQ_TYPES = {"NBIRTH", "DBIRTH", "NDATA", "DDATA", "DDEATH"}
_TELEMETRY = {"NBIRTH", "DBIRTH", "NDATA", "DDATA"}


@dataclass
class NodeState:
    """What the reader knows of one edge node since its last NBIRTH."""

    born: bool = False
    seq: int | None = None
    bdseq: int | None = None
    aliases: dict[int, str] = field(default_factory=dict)
    datatypes: dict[str, int] = field(default_factory=dict)  # metric (device/name) -> datatype
    devices: set[str] = field(default_factory=set)
    last_rebirth_request: float = float("-inf")


@dataclass
class _Metric:
    name: str
    value: Value
    ts: float
    historical: bool
    quality: Quality
    why: str | None


class SparkplugSource:
    """``async for sample in SparkplugSource(cfg)``; see the module docstring."""

    def __init__(self, cfg: SparkplugConfig, file: str | Path | None = None) -> None:
        self.cfg = cfg
        self.file = file
        self.name = cfg.source_name
        self.stats = SourceStats()
        self.nodes: dict[tuple[str, str], NodeState] = {}
        self.ready = asyncio.Event()  # set once connected and subscribed (and STATE born, as a host)
        self._client: Any = None
        self._state_ts = 0  # the STATE timestamp of the current connection (host application)
        self._connects = 0

    # ------------------------------------------------------------ connection

    def _settings(self) -> Any:
        from broker_bridge.client import BrokerSettings

        b = self.cfg.broker or BrokerSettings(url="mqtt://127.0.0.1:1883")
        return replace(
            b,
            client_id=b.client_id or f"fedline-sparkplug-{uuid.uuid4().hex[:8]}",
            clean_start=True,
            session_expiry_s=0,  # the spec forbids persistent sessions
            timeout_s=10.0,
        )

    def filters(self) -> list[str]:
        g, n = self.cfg.group_id, self.cfg.edge_node_id
        out = [f"{NAMESPACE}/{g}/+/{n}", f"{NAMESPACE}/{g}/+/{n}/+"]
        if self.cfg.host_id is not None:
            out.append(state_topic(self.cfg.host_id))
        return out

    def _state_payload(self, online: bool, ts: int) -> bytes:
        return json.dumps({"online": online, "timestamp": ts}).encode()

    def _will(self) -> Any:
        """A new STATE will per connection attempt; its timestamp is the birth's (§5.4)."""
        from broker_bridge.client import will_message

        self._state_ts = int(time.time() * 1000)
        assert self.cfg.host_id is not None
        return will_message(
            state_topic(self.cfg.host_id), self._state_payload(False, self._state_ts), retain=True, qos=1
        )

    async def _on_connect(self, client: Any) -> None:
        """After every (re)connect: forget what may be stale, announce the host, ask for rebirths."""
        self._connects += 1
        reconnect = self._connects > 1
        known = list(self.nodes)
        if reconnect:
            # messages were lost while away: aliases, sequence and birth state of every node are unknown now
            self.nodes = {k: NodeState() for k in known}
        if self.cfg.host_id is not None:
            await self._publish_state_birth(client)
        self.ready.set()
        if reconnect:
            for group, node in known:
                await self._request_rebirth(group, node, self.nodes[(group, node)], "reader reconnected")

    async def _publish_state_birth(self, client: Any) -> None:
        assert self.cfg.host_id is not None
        try:
            await client.publish(
                state_topic(self.cfg.host_id),
                self._state_payload(True, self._state_ts),
                qos=1,
                retain=True,
                timeout=5.0,
            )
            self.stats.bump("state_births")
        except Exception as exc:  # NotConnected / PublishRefused: the next connect tries again
            event(log, "sparkplug.state_birth_failed", logging.WARNING, host_id=self.cfg.host_id, error=repr(exc))

    async def __aiter__(self) -> AsyncIterator[Sample]:
        from broker_bridge.client import MqttClient

        will = self._will if self.cfg.host_id is not None else None
        async with MqttClient(self._settings(), will=will, on_connect=self._on_connect) as client:
            self._client = client
            for f in self.filters():
                await client.subscribe(f, qos=1 if f.startswith(f"{NAMESPACE}/STATE/") else 0)
            watcher = asyncio.create_task(self._watch_connection(client))
            last_connects = 0
            try:
                async for msg in client.messages():
                    if client.stats.connects != last_connects:
                        if last_connects:
                            self.stats.reconnects += 1
                            self.stats.gaps += 1
                            yield Sample.bad(self.name, "reconnected to the broker: messages may have been missed")
                        last_connects = client.stats.connects
                    for sample in await self.handle(msg.topic, msg.payload):
                        yield sample
            finally:
                watcher.cancel()
                await self._publish_state_death(client)
                self._client = None
                self.ready.clear()

    async def _publish_state_death(self, client: Any) -> None:
        """Say offline before an intended disconnect: the broker does not send the will then (§5.13)."""
        if self.cfg.host_id is None or not client.connected.is_set():
            return
        try:
            await client.publish(
                state_topic(self.cfg.host_id),
                self._state_payload(False, int(time.time() * 1000)),
                qos=1,
                retain=True,
                timeout=2.0,
            )
        except Exception as exc:  # shutting down: the will covers it
            event(log, "sparkplug.state_death_failed", logging.WARNING, host_id=self.cfg.host_id, error=repr(exc))

    async def _watch_connection(self, client: Any) -> None:
        while True:
            await client.connected.wait()
            while client.connected.is_set():
                await asyncio.sleep(0.1)
            self.ready.clear()

    # ------------------------------------------------------------ decoding

    async def handle(self, topic: str, payload: bytes) -> list[Sample]:
        """Decode one message into zero or more samples (public for tests and replays)."""
        if self.cfg.host_id is not None and topic == state_topic(self.cfg.host_id):
            await self._own_state(payload)
            return []
        parsed = parse_topic(topic)
        if parsed is None:
            return []
        group, mtype, node, device = parsed
        src = f"{self.name}/{group}/{node}" + (f"/{device}" if device else "")
        now = time.time()
        try:
            p = pb.Payload.FromString(payload)  # type: ignore[attr-defined]  # generated by protoc
        except Exception as exc:  # protobuf's DecodeError and friends
            self.stats.bad_reads += 1
            return [Sample.bad(src, f"undecodable {mtype} payload: {type(exc).__name__}", now)]
        key = (group, node)
        state = self.nodes.setdefault(key, NodeState())
        if mtype == "NDEATH":
            return self._node_death(group, node, state, p, now)
        if mtype == "NBIRTH":
            state = self.nodes[key] = NodeState(
                born=True,
                seq=p.seq if p.HasField("seq") else None,
                bdseq=bdseq_of(p),
                last_rebirth_request=state.last_rebirth_request,
            )
        elif mtype in _SEQ_TYPES and state.born and not self._check_seq(state, p, src):
            await self._request_rebirth(group, node, state, "sequence gap")
        if mtype == "DDEATH":
            if not state.born:
                return []
            state.devices.discard(device or "")
            return [Sample.bad(src, "DDEATH: device offline", now)]
        if mtype not in _TELEMETRY:
            return []  # NCMD / DCMD are not telemetry
        if not state.born:
            self.stats.bad_reads += 1
            await self._request_rebirth(group, node, state, f"{mtype} before NBIRTH")
            return [
                Sample.bad(src, f"{mtype} from a node whose NBIRTH was not seen since the reader (re)connected", now)
            ]
        if device:
            state.devices.add(device)
        return await self._decode(p, mtype, group, node, device, state, src, now)

    async def _decode(
        self, p: Any, mtype: str, group: str, node: str, device: str | None, state: NodeState, src: str, now: float
    ) -> list[Sample]:
        birth = mtype.endswith("BIRTH")
        payload_ts = p.timestamp / 1000.0 if p.HasField("timestamp") else now
        metrics: list[_Metric] = []
        wrong: list[str] = []
        wrong_names: list[str] = []
        unknown = bad_names = 0
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
                value = metric_value(m, datatype)
                quality, why = quality_of(quality_code(m))
            except Unsupported:
                self.stats.bump("unsupported_metrics")
                continue
            except WrongField as exc:
                wrong.append(f"{name!r} ({type_name(datatype)}): {exc}")
                wrong_names.append(name)
                continue
            ts = m.timestamp / 1000.0 if m.HasField("timestamp") else payload_ts
            metrics.append(_Metric(name, None if quality == "bad" else value, ts, bool(m.is_historical), quality, why))
        out = self._samples(metrics, src)
        if wrong:
            self.stats.bad_reads += 1
            self.stats.bump("wrong_field_metrics", len(wrong))
            out.append(
                Sample(
                    ts=payload_ts,
                    source=src,
                    values={n: None for n in wrong_names},
                    quality="bad",
                    error=f"{len(wrong)} metric value(s) not where their datatype puts them: " + "; ".join(wrong),
                )
            )
        if unknown:
            self.stats.bad_reads += 1
            await self._request_rebirth(group, node, state, "unknown alias")
            out.append(Sample.bad(src, f"{unknown} metric(s) with no name and an unknown alias", payload_ts))
        if bad_names:
            self.stats.bad_reads += 1
            self.stats.bump("bad_metric_names", bad_names)
            out.append(Sample.bad(src, f"{bad_names} metric name(s) that are not UTF-8 were ignored", payload_ts))
        return out

    def _samples(self, metrics: list[_Metric], src: str) -> list[Sample]:
        """Live metrics: one sample per quality, at their newest timestamp; historical: one per timestamp too."""
        groups: dict[tuple[float | None, bool, Quality, str | None], list[_Metric]] = {}
        for m in metrics:
            groups.setdefault((m.ts if m.historical else None, m.historical, m.quality, m.why), []).append(m)
        out = []
        for (_, historical, quality, why), ms in groups.items():
            error = None if quality == "good" else f"Quality {why}: {', '.join(m.name for m in ms)}"
            out.append(
                Sample(
                    ts=max(m.ts for m in ms),
                    source=src,
                    values={m.name: m.value for m in ms},
                    quality=quality,
                    error=error,
                    historical=historical,
                )
            )
            if quality == "good":
                self.stats.reads += 1
            else:
                self.stats.bad_reads += 1
            if historical:
                self.stats.bump("historical_samples")
        return out

    def _node_death(self, group: str, node: str, state: NodeState, p: Any, now: float) -> list[Sample]:
        """NDEATH: the node and its devices go offline, if it is the current session's death (bdSeq)."""
        got = bdseq_of(p)
        if not state.born or got != state.bdseq:
            self.stats.bump("stale_ndeath")
            event(
                log,
                "sparkplug.ndeath_ignored",
                logging.WARNING,
                group=group,
                node=node,
                bdseq=got,
                expected=state.bdseq if state.born else None,
                reason="bdSeq mismatch" if state.born else "not online",
            )
            return []
        devices = sorted(state.devices)
        self.nodes[(group, node)] = NodeState(last_rebirth_request=state.last_rebirth_request)
        base = f"{self.name}/{group}/{node}"
        return [Sample.bad(base, "NDEATH: edge node offline", now)] + [
            Sample.bad(f"{base}/{d}", "NDEATH: edge node offline, so is its device", now) for d in devices
        ]

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

    async def _own_state(self, payload: bytes) -> None:
        """Someone (or our old session's will) says we are offline: say online again (§5.4)."""
        try:
            online = json.loads(payload).get("online")
        except (ValueError, AttributeError):
            return
        if online is False and self._client is not None and self._client.connected.is_set():
            self.stats.bump("state_rebirths")
            await self._publish_state_birth(self._client)

    async def _request_rebirth(self, group: str, node: str, state: NodeState, why: str) -> None:
        if not self.cfg.rebirth or self._client is None:
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
