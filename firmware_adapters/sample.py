"""The one thing every source yields: a :class:`Sample`, plus the counters a
source keeps in :class:`SourceStats`.

Why one small type: the edge agent, the line inference and the benchmarks all
consume samples from Modbus, serial lines, OPC UA, MQTT/Sparkplug and CSV
replay alike; a frozen dataclass with a plain ``tag -> value`` dict is the
least they all need. A failed read is still a sample (``quality="bad"`` with an
``error`` text and usually no values), so a consumer sees outages in the stream
instead of a silence, and nothing has to raise through ``async for``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Value = float | int | bool | str | None
"""A tag's value. ``None`` means the device reported the tag as null/missing."""

Quality = Literal["good", "uncertain", "bad"]


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of a set of tags from one source at one time.

    ``ts`` is a Unix timestamp in seconds (device time where the protocol gives
    one, else receive time); ``source`` names where it came from (the source's
    configured name, with a sub-path for Sparkplug nodes); ``quality`` applies
    to the whole sample; ``error`` says why a sample is not good.
    ``historical`` marks values the device sends late (Sparkplug's
    ``is_historical``: store-and-forward after an outage, backfill): real data
    from ``ts``, but not the current state of the line, so consumers keep
    them apart from live values.
    """

    ts: float
    source: str
    values: Mapping[str, Value]
    quality: Quality = "good"
    error: str | None = None
    historical: bool = False

    @property
    def good(self) -> bool:
        return self.quality == "good"

    @classmethod
    def bad(cls, source: str, error: str, ts: float | None = None) -> Sample:
        """A bad-quality sample recording a failed read (no values)."""
        return cls(ts=time.time() if ts is None else ts, source=source, values={}, quality="bad", error=error)


@dataclass
class SourceStats:
    """Counters every source keeps; read them any time, e.g. for /metrics.

    - ``reads``: samples yielded with good quality
    - ``bad_reads``: failed reads, framing errors, undecodable messages
    - ``reconnects``: successful reconnections after a lost connection
    - ``gaps``: outages (connection lost, then later back) or sequence gaps
    - ``skipped``: rows/messages known to be missed (row counter or seq jumps)
    - ``repeats``: polls that returned an unchanged row counter (not yielded)
    """

    reads: int = 0
    bad_reads: int = 0
    reconnects: int = 0
    gaps: int = 0
    skipped: int = 0
    repeats: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def bump(self, name: str, n: int = 1) -> None:
        """Count a source-specific event (e.g. ``rebirth_requests``)."""
        self.extra[name] = self.extra.get(name, 0) + n

    def as_dict(self) -> dict[str, int]:
        return {
            "reads": self.reads,
            "bad_reads": self.bad_reads,
            "reconnects": self.reconnects,
            "gaps": self.gaps,
            "skipped": self.skipped,
            "repeats": self.repeats,
            **self.extra,
        }
