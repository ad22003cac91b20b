"""``fedline status --json``: the federation view as one JSON document, for scripts and monitoring.

Why a separate, versioned schema: the table is for people and may change; a
script (a cron check, a Prometheus textfile exporter, CI) needs field names that
stay put. ``"schema": 1`` changes only when a field changes meaning or goes
away; new fields may be added. The schema is documented in
docs/architecture.md ("fedline status --json").

Everything in it came from the broker's retained messages and the receipts
seen while listening, exactly as ``fedline status`` prints it; nothing is read
from the aggregator's disk.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from broker_bridge.observer import FederationView

SCHEMA = 2  # 2: models and receipts are sealed (issue 13): model {version, epoch}, receipts counted, not read


def status_document(view: FederationView, listen_s: float) -> dict[str, Any]:
    """The JSON-ready document of one ``collect`` (see the module docstring for the contract)."""
    totals: Counter[str] = Counter()
    sites: dict[str, Any] = {}
    for name in sorted(view.sites):
        sv = view.sites[name]
        totals.update(sv.receipts)
        sites[name] = {
            "state": sv.status.get("state", "never seen"),
            "status": sv.status,  # the site's retained document, as it published it
            "receipts": dict(sorted(sv.receipts.items())),
        }
    m = view.model
    return {
        "schema": SCHEMA,
        "federation": view.federation,
        "collected_at": round(time.time(), 3),
        "listen_s": listen_s,
        "model": None if m is None else {"version": m.get("version"), "epoch": m.get("epoch")},
        "services": {user: view.services[user] for user in sorted(view.services)},
        "sites": sites,
        "online_sites": sum(1 for s in sites.values() if s["state"] == "online"),
        "receipts": dict(sorted(totals.items())),
        "bad_messages": view.malformed,
    }
