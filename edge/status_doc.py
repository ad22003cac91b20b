"""The retained status an edge publishes: liveness and privacy, nothing computed from plant data.

Why so little: the status topic is readable by the broker operator and the
federation's observer, outside any sealing and outside the ε budget. Row
counts, losses and accuracies describe the plant's data and production rate
(issue 13), so they go to the plant's own Prometheus (``edge.metrics``) and
logs only. The update counter is left out too: it would give away the
training cadence. What stays: the state (online/offline), the global version
in use, the newest key epoch the site holds (-1: none yet; with the version, it
is what the aggregator's catch-up reads, ``aggregator.catchup``; epochs are
public, like versions), the DP parameters, the unit protected and ε spent against the budget
(public by design, DESIGN.md), whether the site is publishing, the outbox depth, and the last
global version it refused as too far a step (``model_refused``: version and ``"step"``; versions are
public, and an operator must see that a site stays behind on purpose, ``models.step_bound``), and the wire
formats beyond version 1's the agent reads (``reads``: ``["FLT2"]``; the aggregator publishes models with the
tensor table by reference only when every enrolled site says so: a software version, nothing about the plant).

One builder, so that fields added later (e.g. per-record ε) have one home.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

#: the public privacy figures a status may carry (``EdgeAgent.privacy_status``: DP parameters, ε, the unit)
PRIVACY_FIELDS = ("privacy", "accounting", "epsilon", "epsilon_budget", "delta", "privacy_unit")
#: every key a status may carry; the adversarial capture test checks statuses against it
STATUS_FIELDS = (
    "state",
    "version",
    "epoch",
    *PRIVACY_FIELDS,
    "publishing",
    "outbox_depth",
    "model_refused",
    "reads",
    "ts",
)


def build_status(
    *,
    state: str,
    version: int,
    privacy: Mapping[str, Any],
    publishing: str,
    outbox_depth: int,
    epoch: int = -1,
    model_refused: Mapping[str, Any] | None = None,
    reads: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The status document. ``privacy``: the site's public privacy figures, keys from :data:`PRIVACY_FIELDS`.

    A key outside that list is refused here, on purpose: adding a field to what every
    observer reads is a decision, made by adding it to the list.
    """
    unknown = sorted(set(privacy) - set(PRIVACY_FIELDS))
    if unknown:
        raise ValueError(f"status privacy fields {unknown} are not in edge.status_doc.PRIVACY_FIELDS")
    return {
        "state": state,
        "version": version,
        "epoch": epoch,
        **privacy,
        "publishing": publishing,
        "outbox_depth": outbox_depth,
        **({"model_refused": dict(model_refused)} if model_refused else {}),
        **({"reads": list(reads)} if reads else {}),
        "ts": round(time.time(), 1),
    }
