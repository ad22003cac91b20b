"""The traffic audit: record everything the broker carried and look for raw records in it.

A separate subscriber (the broker's read-only ``observer`` user, whose ACL lets
it read the whole federation ``fedline/<federation>/#``) records every message.
At the end each payload is searched for every record of every site, in the
forms a leak would take:

- **as text**: every number in the payload is parsed (``298.1``, ``2.981e2``,
  ``"1551"``, ``0.31``...) and a record counts as seen when *all* its feature
  values, raw or normalised to [0, 1], occur in one payload (to 4 decimals);
- **as packed binary**: the payload is read as float32 and float64, little and
  big endian, at every byte offset, and a record counts as seen when all its
  feature values (raw or normalised, in that precision) occur in one payload.

Requiring all of a record's values in one message is what makes it a record
rather than a coincidence: a single ``0`` or ``42.8`` turns up in ciphertext
by chance, five given values do not.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_NUMBER = re.compile(rb"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_DTYPES = ("<f4", ">f4", "<f8", ">f8")


@dataclass(frozen=True)
class Recorded:
    topic: str
    payload: bytes
    retain: bool
    t: float


class RawRecordDetector:
    """Looks for records (rows of feature values) in message payloads."""

    def __init__(self, raw: np.ndarray, normalised: np.ndarray) -> None:
        raw = np.asarray(raw, dtype=np.float64)
        norm = np.asarray(normalised, dtype=np.float64)
        self.n_records = len(raw)
        self._forms = [raw, norm]
        self._text_forms = [np.round(f, 4) for f in self._forms]

    def _match(self, forms: list[np.ndarray], values: np.ndarray) -> set[int]:
        found: set[int] = set()
        if values.size == 0:
            return found
        values = np.unique(values)
        for f in forms:
            hit = np.isin(f, values).all(axis=1)
            found.update(np.flatnonzero(hit).tolist())
        return found

    def find(self, payload: bytes) -> set[int]:
        """Indices of the records whose values all occur in ``payload`` (text or packed floats)."""
        found: set[int] = set()
        nums = []
        for m in _NUMBER.finditer(payload):
            try:
                nums.append(float(m.group()))
            except ValueError:
                continue
        if nums:
            arr = np.array(nums, dtype=np.float64)
            arr = arr[np.abs(arr) < 1e300]  # digits in ciphertext can read as 1e308; rounding those overflows
            found |= self._match(self._text_forms, np.round(arr, 4))
        for dt in _DTYPES:
            size = np.dtype(dt).itemsize
            if len(payload) < size:
                continue
            views = []
            for off in range(size):
                n = (len(payload) - off) // size
                if n:
                    views.append(np.frombuffer(payload, dtype=dt, count=n, offset=off))
            vals = np.concatenate(views)
            vals = vals[np.isfinite(vals)]
            forms = [f.astype(np.dtype(dt).newbyteorder("=")) for f in self._forms]
            found |= self._match(forms, vals.astype(forms[0].dtype))
        return found


@dataclass
class AuditResult:
    messages: int
    bytes: int  # payload + topic bytes of every message recorded
    raw_records: int  # distinct records found anywhere
    messages_with_records: list[str] = field(default_factory=list)  # topics of offending messages
    by_kind: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "messages": self.messages,
            "bytes": self.bytes,
            "raw_records": self.raw_records,
            "messages_with_records": self.messages_with_records[:20],
            "by_kind": self.by_kind,
        }


def audit(messages: list[Recorded], detector: RawRecordDetector, topic_kind=None) -> AuditResult:
    """Search every recorded message for raw records."""
    seen: set[int] = set()
    offending: list[str] = []
    by_kind: dict[str, int] = {}
    for m in messages:
        kind = topic_kind(m.topic) if topic_kind else "message"
        by_kind[kind] = by_kind.get(kind, 0) + 1
        hits = detector.find(m.payload)
        if hits:
            seen |= hits
            offending.append(m.topic)
    return AuditResult(
        len(messages), sum(len(m.payload) + len(m.topic) for m in messages), len(seen), offending, by_kind
    )


class TrafficRecorder:
    """Subscribes to a filter as the observer and keeps every message, in arrival order.

    ``on_message`` (optional) sees each message as it arrives: the demo's
    progress view reads manifests, receipts and statuses from here.
    """

    def __init__(self, settings, topic_filter: str, on_message=None) -> None:
        self.settings = settings
        self.topic_filter = topic_filter
        self.on_message = on_message
        self.messages: list[Recorded] = []
        self._task: asyncio.Task | None = None
        self._client: Any = None  # a broker_bridge.client.MqttClient once started
        self.ready = asyncio.Event()

    async def start(self) -> TrafficRecorder:
        from broker_bridge.client import MqttClient

        client = self._client = MqttClient(self.settings)
        await client.__aenter__()
        await client.subscribe(self.topic_filter, qos=1)
        await client.wait_connected(self.settings.timeout_s)
        self._task = asyncio.create_task(self._run())
        self.ready.set()
        return self

    async def _run(self) -> None:
        assert self._client is not None
        async for msg in self._client.messages():
            rec = Recorded(msg.topic, msg.payload, msg.retain, time.time())
            self.messages.append(rec)
            if self.on_message is not None:
                try:
                    self.on_message(rec)
                except Exception:  # a progress-view bug must not stop the recording
                    import logging

                    logging.getLogger("fedline.demo").exception("progress handler failed on %s", msg.topic)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._client is not None:
            await self._client.close()
