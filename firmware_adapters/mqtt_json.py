"""Plain JSON telemetry over MQTT: one JSON object per message.

``{"temp": 21.5, "motor": {"rpm": 1500}}`` on ``plant/line7/telemetry`` yields a
sample with tags ``temp`` and ``motor.rpm`` (``tag_prefix_topic = true`` makes
them ``plant/line7/telemetry/temp``...). ``ts_key`` names a field carrying the
device timestamp (Unix seconds, or milliseconds when it is larger than 1e11).
A message that is not a JSON object, or holds lists, is a counted bad sample.

The connection is the broker_bridge client (reconnects forever with backoff,
resubscribes on every connect), with every broker key of ``BrokerSettings``
(TLS with ``mqtts://`` and ``ca_file`` / ``cert_file`` / ``key_file``,
``password_file``, ``protocol = "3.1.1"`` or ``"5"``); a telemetry reader wants
no backlog from while it was away, so it always connects with a clean session.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from firmware_adapters.config import MqttJsonConfig
from firmware_adapters.sample import Sample, SourceStats
from firmware_adapters.serial_lines import FramingError, flatten


class MqttJsonSource:
    """``async for sample in MqttJsonSource(cfg)``; see the module docstring."""

    def __init__(self, cfg: MqttJsonConfig, file: str | Path | None = None) -> None:
        self.cfg = cfg
        self.file = file
        self.name = cfg.source_name
        self.stats = SourceStats()
        self.ready = asyncio.Event()

    def _settings(self) -> Any:
        from dataclasses import replace

        b = self.cfg.broker
        return replace(
            b,
            client_id=b.client_id or f"fedline-telemetry-{uuid.uuid4().hex[:8]}",
            clean_start=True,
            session_expiry_s=0,
        )

    def decode(self, topic: str, payload: bytes) -> Sample:
        """One message to one sample (bad quality if it is not a JSON object of scalars)."""
        try:
            obj = json.loads(payload)
            if not isinstance(obj, dict):
                raise FramingError("not a JSON object")
            values = flatten(obj, self.cfg.flatten_separator)
        except (ValueError, FramingError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            self.stats.bad_reads += 1
            return Sample.bad(self.name, f"{topic}: {exc}")
        ts = time.time()
        if self.cfg.ts_key is not None and self.cfg.ts_key in values:
            tsv = values.pop(self.cfg.ts_key)
            if isinstance(tsv, (int, float)) and not isinstance(tsv, bool):
                ts = tsv / 1000.0 if tsv > 1e11 else float(tsv)
        if self.cfg.tag_prefix_topic:
            values = {f"{topic}/{k}": v for k, v in values.items()}
        self.stats.reads += 1
        return Sample(ts=ts, source=self.name, values=values)

    async def __aiter__(self) -> AsyncIterator[Sample]:
        from broker_bridge.client import MqttClient

        async with MqttClient(self._settings()) as client:
            for topic in self.cfg.topics:
                await client.subscribe(topic, qos=self.cfg.qos)
            await client.wait_connected(None)
            self.ready.set()
            connects = client.stats.connects
            try:
                async for msg in client.messages():
                    if client.stats.connects != connects:
                        self.stats.gaps += 1
                        self.stats.reconnects += 1
                        connects = client.stats.connects
                    yield self.decode(msg.topic, msg.payload)
            finally:
                self.ready.clear()
