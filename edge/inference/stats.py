"""What a line service counts about itself: rows, predictions, refusals and every change of model.

Why apart from the Prometheus metrics (``edge.inference.outputs.Metrics``): these are the exact in-process
figures the tests and ``bench/infer.py`` read (each swap with the first row it scored, every latency sample).
"""

from __future__ import annotations

from collections import Counter as Tally
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Swap:
    """One change of the model in service: from which sample on, and how long it took."""

    version: int
    previous: int | None
    first_seq: int  # the first row scored by ``version``
    seconds: float  # new version seen -> serving (0 for rollbacks and restarts)
    kind: str  # "reload" | "rollback" | "restore"


@dataclass
class ServiceStats:
    """The service's running totals (see the module docstring)."""

    rows: int = 0
    predictions: int = 0
    alarms: int = 0
    score_errors: int = 0
    # feature values outside their engineering range, clamped to it by the RowBuilder: a sensor fault, a
    # range set too narrow, or an input crafted to sit where no training row was (a backdoor trigger)
    out_of_range: int = 0
    batches: int = 0
    refused: Tally = field(default_factory=Tally)
    swaps: list[Swap] = field(default_factory=list)
    served: dict[str, Any] | None = None  # the model in service: kind and validation metric (edge/personal.py)
    batch_latency: deque = field(default_factory=lambda: deque(maxlen=100_000))  # (rows, seconds)
    row_latency: deque = field(default_factory=lambda: deque(maxlen=100_000))  # queued -> emitted, s
