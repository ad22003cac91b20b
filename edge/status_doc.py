"""The retained status an edge publishes: liveness and privacy, nothing computed from plant data.

Why so little: the status topic is readable by the broker operator and the
federation's observer, outside any sealing and outside the ε budget. Row
counts, losses and accuracies describe the plant's data and production rate
(issue 13), so they go to the plant's own Prometheus (``edge.metrics``) and
logs only. The update counter is left out too: it would give away the
training cadence. What stays: the state (online/offline), the global version
in use, the DP parameters and ε spent against the budget (public by design,
DESIGN.md), whether the site is publishing, and the outbox depth.

One builder, so that fields added later (e.g. per-record ε) have one home.
"""

from __future__ import annotations

import time
from typing import Any

#: every key a status may carry; the adversarial capture test checks statuses against it
STATUS_FIELDS = (
    "state",
    "version",
    "privacy",
    "epsilon",
    "epsilon_budget",
    "delta",
    "publishing",
    "outbox_depth",
    "ts",
)


def build_status(
    *, state: str, version: int, dp: Any, epsilon: float, publishing: str, outbox_depth: int
) -> dict[str, Any]:
    """The status document. ``dp`` is the site's privacy config (None when DP is off)."""
    return {
        "state": state,
        "version": version,
        "privacy": "on" if dp else "off",
        "epsilon": round(epsilon, 6),
        "epsilon_budget": dp.epsilon if dp else None,
        "delta": dp.delta if dp else None,
        "publishing": publishing,
        "outbox_depth": outbox_depth,
        "ts": round(time.time(), 1),
    }
