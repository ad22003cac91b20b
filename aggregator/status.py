"""``fedline status``: the federation as the broker sees it, from retained messages alone.

Why from the broker: an operator on any machine with observer credentials can
see the federation without access to the aggregator's disk. Statuses (retained,
``offline`` by last will) and the manifest (retained) arrive at once; receipts
are not retained, so they are counted while listening for ``--listen`` seconds.
The observer is an outsider (issue 13): a manifest is sealed to the
federation's members, so ``status`` shows its version number and key epoch,
the two numbers outside the ciphertext, and nothing of the model; receipts
are sealed to their site, so it counts them; site statuses carry liveness,
version, ε and outbox depth only.

Config: the aggregator's own TOML works (its ``[aggregator]`` table gives the
federation and enrollment; point ``[broker]`` at observer credentials), or a
small file::

    federation = "plant-1"
    enrollment_file = "enrollment.json"   # optional: list every enrolled site, seen or not
    [broker]
    url = "mqtt://127.0.0.1:1883"
    username = "observer"
    password_file = "credentials/observer.password"
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker_bridge.client import BrokerSettings, MqttClient
from broker_bridge.keys import Enrollment
from broker_bridge.observer import FederationView, Observer
from broker_bridge.topics import Topics
from fedline.config import ConfigError, load_toml, parse, resolve_path


@dataclass(frozen=True)
class StatusConfig:
    federation: str
    broker: BrokerSettings
    topic_prefix: str = "fedline"
    enrollment_file: str | None = None


def load_status_config(path: str | Path) -> StatusConfig:
    table = load_toml(path)
    if "aggregator" in table:  # the aggregator's own file
        agg = table["aggregator"]
        if not isinstance(agg, dict) or "federation" not in agg:
            raise ConfigError(path, "aggregator.federation", "missing")
        table = {
            "federation": agg["federation"],
            "topic_prefix": agg.get("topic_prefix", "fedline"),
            "enrollment_file": agg.get("enrollment_file"),
            "broker": table.get("broker", {}),
        }
        table = {k: v for k, v in table.items() if v is not None}
    broker_table = table.get("broker", {})
    if not isinstance(broker_table, dict):
        raise ConfigError(path, "broker", "must be a table")
    b = BrokerSettings.from_table(broker_table, path, "broker")  # the one parser of broker tables
    cfg = parse(StatusConfig, {**table, "broker": {}}, file=path)
    changes: dict[str, Any] = {}
    if not b.client_id:
        changes["client_id"] = f"fedline-status-{int(time.time() * 1000) % 1_000_000}"
    return dataclasses.replace(
        cfg,
        broker=dataclasses.replace(b, clean_start=True, **changes),
        enrollment_file=str(resolve_path(path, cfg.enrollment_file)) if cfg.enrollment_file else None,
    )


async def collect(cfg: StatusConfig, listen_s: float = 3.0) -> FederationView:
    """Listen as the observer for ``listen_s`` seconds: the retained state at once, receipts while listening."""
    topics = Topics(cfg.federation, cfg.topic_prefix)
    sites = Enrollment.load(cfg.enrollment_file).sites if cfg.enrollment_file else ()
    observer = Observer(topics, sites)  # no keys: what an outsider reads
    async with MqttClient(cfg.broker) as client:
        await client.wait_connected(cfg.broker.timeout_s)
        for flt in observer.subscriptions():
            await client.subscribe(flt, qos=1)
        deadline = asyncio.get_running_loop().time() + listen_s
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                msg = await asyncio.wait_for(client.messages().__anext__(), left)
            except TimeoutError:
                break
            observer.on_message(msg)
    return observer.view


def _age(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    s = max(0.0, time.time() - ts)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"


def render(view: FederationView) -> str:
    """The table, as text (rich), so tests and the CLI print the same thing."""
    from rich.console import Console
    from rich.table import Table

    m = view.model
    title = f"federation {view.federation}: model version " + (
        f"{m['version']} (key epoch {m['epoch']}, sealed to the members)" if m else "unknown (no manifest)"
    )
    table = Table(title=title)
    for col in ("site", "state", "status age", "base version", "ε spent", "publishing", "outbox", "receipts (sealed)"):
        table.add_column(col)
    for name in sorted(view.sites):
        sv = view.sites[name]
        st = sv.status
        eps = st.get("epsilon")
        budget = st.get("epsilon_budget")
        eps_txt = "-" if eps is None else f"{eps:.3g}" + (f" / {budget:g}" if budget else "")
        table.add_row(
            name,
            str(st.get("state", "never seen")),
            _age(st.get("ts")),
            str(st.get("version", "-")),
            eps_txt,
            str(st.get("publishing", "-")),
            str(st.get("outbox_depth", "-")),
            str(sv.receipts["sealed"]) if sv.receipts else "-",
        )
    console = Console(width=140, record=True, file=open("/dev/null", "w"))
    console.print(table)
    agg = view.services.get("aggregator")
    if agg:  # its retained liveness: state, version and the reduce in force (broker_bridge.liveness)
        console.print(
            f"aggregator: {agg.get('state', '?')}, version {agg.get('version', '-')}, reduce {agg.get('reduce', '-')}"
        )
    totals: Counter[str] = Counter()
    for sv in view.sites.values():
        totals.update(sv.receipts)
    online = sum(1 for sv in view.sites.values() if sv.status.get("state") == "online")
    console.print(
        f"{len(view.sites)} sites, {online} online; receipts while listening: "
        + (f"{totals['sealed']} (sealed to their sites)" if totals else "none")
        + (f"; {view.malformed} unreadable messages" if view.malformed else "")
    )
    return console.export_text()
