"""The demo's live table of the federation, drawn from what the observer reads on the wire.

The demo takes nothing from inside the processes: :class:`broker_bridge.observer.Observer`
records the broker's traffic (given the sites' keys, which the demo generated, it opens their
receipts and plays the first site to score each version's ONNX); this module only draws it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from broker_bridge.observer import FederationView


def site_table(view: FederationView, metric: str, intermittent: str | None, cut: bool) -> Any:
    """A rich table of the live state (the demo's progress view)."""
    from rich.table import Table

    t = Table(
        title=f"fedline demo — global model v{view.version} — {time.time() - view.started:.0f} s", title_justify="left"
    )
    for col in (
        "site",
        "link",
        "updates sent",
        "applied",
        "buffered",
        "stale",
        "rejected",
        "staleness (mean)",
        "ε spent / budget",
        "outbox",
        f"{metric} of latest global",
    ):
        t.add_column(col, justify="right" if col not in ("site", "link") else "left")
    last = view.history[-1]["metrics"] if view.history else {}
    for name, s in view.sites.items():
        st = s.status
        link = "CUT" if (name == intermittent and cut) else (st.get("state", "…"))
        eps = st.get("epsilon")
        budget = st.get("epsilon_budget")
        m = last.get(name)
        t.add_row(
            name + (" *" if name == intermittent else ""),
            link,
            str(s.updates_sent),
            str(s.count("applied")),
            str(s.count("buffered")),
            str(s.count("stale")),
            str(s.count("rejected")),
            f"{np.mean(s.staleness):.2f}" if s.staleness else "–",
            f"{eps:.2f} / {budget:.1f}" if eps is not None and budget else "–",
            str(st.get("outbox_depth", "–")),
            f"{m:.3f}" if isinstance(m, float) else "–",
        )
    return t
