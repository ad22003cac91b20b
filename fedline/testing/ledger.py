"""Reconcile what the sites sealed with what the aggregator decided: the proof of "none lost, none twice".

Two ledgers, both on disk, read here without the processes' help (read-only
SQLite, so it works while they run and after a kill -9):

- each site's ``<data_dir>/outbox.sqlite`` table ``ledger``: every update the
  site ever sealed (counter, msg_id) and the verdict its signed receipt gave
  (``queued``/``sent`` while it has none yet; ``dropped`` when the outbox
  policy dropped it);
- the aggregator's ``<state_dir>/aggregator.sqlite``: table ``verdicts`` (one
  per (site, counter): applied, buffered, stale, rejected) and each model
  version's lineage, the list of updates reduced into it.

Exact means: every sealed update that the site's policy did not drop has one
verdict with the same msg_id; every ``applied`` one is in exactly one
version's lineage (its version), no stale/buffered/rejected one is in any;
every buffered one is in the live buffer; the aggregator knows nothing no site
sealed; and every site holds the receipt (its verdict equals the aggregator's,
except that a site keeps ``buffered`` when the later ``applied`` receipt of the
same update comes: both say "taken").
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Key = tuple[str, int]  # (site, counter)


def _ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)


def read_site_ledger(outbox_db: Path) -> list[dict[str, Any]]:
    """Every update a site sealed: site, counter, msg_id, state, reason, version."""
    if not Path(outbox_db).exists():
        return []
    try:
        with _ro(Path(outbox_db)) as con:
            rows = con.execute(
                "SELECT site, counter, msg_id, state, reason, version, base_version FROM ledger ORDER BY counter"
            ).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # the agent has created the file but not its tables yet
            return []
        raise
    return [dict(zip(("site", "counter", "msg_id", "state", "reason", "version", "base_version"), r)) for r in rows]


def read_aggregator(db: Path) -> tuple[list[dict[str, Any]], dict[int, list[dict[str, Any]]], list[Key]]:
    """(verdicts, lineage updates by version, keys in the live buffer) from the aggregator's store."""
    with _ro(Path(db)) as con:
        verdicts = [
            dict(zip(("site", "counter", "msg_id", "verdict", "reason", "version", "staleness", "decided_at"), r))
            for r in con.execute(
                "SELECT site, counter, msg_id, verdict, reason, version, staleness, decided_at FROM verdicts"
            )
        ]
        lineage = {
            v: json.loads(text).get("updates", [])
            for v, text in con.execute("SELECT version, lineage FROM checkpoints ORDER BY version")
        }
        buffer = [(s, c) for s, c in con.execute("SELECT site, counter FROM buffer")]
    return verdicts, lineage, buffer


@dataclass
class LedgerReport:
    """The figures of one run and every discrepancy, by kind (each a list of (site, counter))."""

    sealed: int = 0
    applied: int = 0
    buffered: int = 0  # taken, waiting in the aggregator's FedBuff buffer at the end
    stale: int = 0
    rejected: int = 0
    dropped_by_policy: int = 0  # the site's outbox policy dropped it before it reached the aggregator
    dropped_after_send: int = 0  # dropped at the site, but it had gone out and was decided anyway
    pruned: int = 0  # decided long ago: the aggregator kept no verdict row, lineage or receipt settle it
    versions: int = 0
    staleness: Counter = field(default_factory=Counter)  # staleness of taken updates -> count
    lost: list[Key] = field(default_factory=list)
    duplicated: list[Key] = field(default_factory=list)
    phantom: list[Key] = field(default_factory=list)
    unsettled: list[Key] = field(default_factory=list)  # decided, but the site has no receipt yet
    mismatched: list[tuple[Key, str, str]] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not (self.lost or self.duplicated or self.phantom or self.unsettled or self.mismatched)

    def figures(self) -> dict[str, Any]:
        return {
            "sealed": self.sealed,
            "applied": self.applied,
            "buffered": self.buffered,
            "stale": self.stale,
            "rejected": self.rejected,
            "dropped_by_policy": self.dropped_by_policy,
            "dropped_after_send": self.dropped_after_send,
            "pruned": self.pruned,
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "phantom": len(self.phantom),
            "unsettled": len(self.unsettled),
            "mismatched": len(self.mismatched),
            "versions": self.versions,
            "staleness": dict(sorted(self.staleness.items())),
        }

    def problems(self) -> str:
        parts = []
        for name in ("lost", "duplicated", "phantom", "unsettled", "mismatched"):
            items = getattr(self, name)
            if items:
                parts.append(f"{name} ({len(items)}): {items[:10]}")
        return "; ".join(parts) or "none"


def _pruned(k: Key, e: dict, entry: dict | None, versions: list[int] | None) -> dict | None:
    """The verdict of an update whose row the aggregator pruned: from the lineage (applied) or the site's
    signed receipt (stale or rejected: they shaped no model); None if neither settles it (then it is lost)."""
    if entry is not None:
        return {
            "msg_id": entry["msg_id"],
            "verdict": "applied",
            "version": versions[0] if versions else None,
            "staleness": entry.get("staleness"),
        }
    if e["state"] in ("stale", "rejected"):
        return {"msg_id": e["msg_id"], "verdict": e["state"], "version": None, "staleness": None}
    return None


def _later_fate(v: dict) -> bool:
    """A buffered update's later verdict, whose receipt a site may never get (an aggregator killed between
    committing it and publishing the receipt, and the site does not resend what was buffered): reduced into
    a version (applied), or replaced in the buffer by a newer update of its site (stale, superseded).
    Neither loses nor duplicates it: the lineage says which."""
    return v["verdict"] == "applied" or (v["verdict"] == "stale" and v.get("reason") == "superseded")


def reconcile(site_dbs: dict[str, Path], aggregator_db: Path) -> LedgerReport:
    """Compare every site's ledger with the aggregator's verdicts and lineage."""
    rep = LedgerReport()
    verdicts, lineage, buffer = read_aggregator(aggregator_db)
    by_key = {(v["site"], v["counter"]): v for v in verdicts}
    rep.versions = max(lineage) if lineage else 0
    in_lineage: Counter = Counter()
    lineage_version: dict[Key, list[int]] = {}
    lineage_entry: dict[Key, dict] = {}
    for version, updates in lineage.items():
        for u in updates:
            k = (u["site"], int(u["counter"]))
            in_lineage[k] += 1
            lineage_version.setdefault(k, []).append(version)
            lineage_entry[k] = u
    # the aggregator keeps each site's newest keep_verdicts counters; below a site's lowest kept one, an
    # applied update is known by its lineage (kept for every version) and a refused one by its signed receipt
    window: dict[str, int] = {}
    for row in verdicts:
        window[row["site"]] = min(window.get(row["site"], row["counter"]), row["counter"])
    live_buffer = Counter(buffer)

    sealed_keys: set[Key] = set()
    for site, db in site_dbs.items():
        for e in read_site_ledger(db):
            k = (site, e["counter"])
            sealed_keys.add(k)
            rep.sealed += 1
            v = by_key.get(k)
            if e["state"] == "dropped":
                if v is None:
                    rep.dropped_by_policy += 1
                    continue
                rep.dropped_after_send += 1
            elif v is None and e["counter"] < window.get(site, 0):
                v = _pruned(k, e, lineage_entry.get(k), lineage_version.get(k))
                rep.pruned += 1
            if v is None:
                rep.lost.append(k)
                continue
            if v["msg_id"] != e["msg_id"]:
                rep.mismatched.append((k, f"site msg_id {e['msg_id']}", f"aggregator msg_id {v['msg_id']}"))
                continue
            verdict = v["verdict"]
            if verdict == "applied":
                rep.applied += 1
                if in_lineage[k] > 1:
                    rep.duplicated.append(k)  # reduced into the model more than once
                elif lineage_version.get(k) != [v["version"]]:
                    rep.mismatched.append(
                        (k, f"applied in version {v['version']}", f"lineage versions {lineage_version.get(k)}")
                    )
            elif verdict == "buffered":
                rep.buffered += 1
                if live_buffer[k] != 1 or in_lineage[k]:
                    rep.mismatched.append((k, "buffered", f"in buffer {live_buffer[k]}x, in lineage {in_lineage[k]}x"))
            else:
                rep.stale += verdict == "stale"
                rep.rejected += verdict == "rejected"
                if in_lineage[k]:
                    rep.duplicated.append(k)  # a refused update shaped a model
            if verdict in ("applied", "buffered") and v["staleness"] is not None:
                rep.staleness[int(v["staleness"])] += 1
            if e["state"] == "dropped":
                continue
            if e["state"] in ("queued", "sent"):
                rep.unsettled.append(k)
            elif e["state"] != verdict and not (e["state"] == "buffered" and _later_fate(v)):
                rep.mismatched.append((k, f"site says {e['state']}", f"aggregator says {verdict}"))
    for k in by_key:
        if k not in sealed_keys:
            rep.phantom.append(k)
    for k in in_lineage:
        if k not in sealed_keys:
            rep.phantom.append(k)
    return rep
