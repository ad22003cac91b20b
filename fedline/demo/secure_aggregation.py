"""Secure aggregation in the demo: its settings, and the report's ``secure_aggregation`` block.

Why a module of its own: the demo turns secure aggregation on whenever the federation can run it
(at least 3 sites: a cohort of 2 would reveal each member's update to the other), and the report
must say what the cohorts did in *this* run. The figures come from the aggregator's own SQLite
store after the run (each version's lineage names its cohort, its survivors, its dropped and
silent members; failed cohorts are counted in the store's meta table), not from the demo's view
of the wire: the store is what the aggregator acted on.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

MIN_SITES = 3  # a cohort of 2 reveals each member's update to the other ([strategy] min_sites)

# [secagg] of the demo's aggregator. A cohort closes as soon as every member submitted or every member
# yet to submit went offline (the cut-off site's last will), so the deadline only bounds a member that
# stays online and never submits; unmasking takes a few broker round trips.
SECAGG_TABLE: dict[str, float] = {"gather_s": 2.0, "deadline_s": 30.0, "unmask_timeout_s": 15.0}


def enabled(wanted: bool, n_sites: int) -> bool:
    """Secure aggregation runs when asked for and the federation has enough sites for a cohort."""
    return wanted and n_sites >= MIN_SITES


def report_block(state_db: Path, on: bool, min_sites: int) -> dict[str, Any]:
    """``report.json``'s ``secure_aggregation``: what the cohorts did, read from the aggregator's store.

    ``cohorts``: cohorts whose sum became a version; ``cohorts_failed``: cohorts that ended with
    ``secagg_cohort_failed`` receipts (too few submissions or answers, a sum over its bound, or the
    aggregator restarting while they were open); ``dropouts_recovered``: members of applied cohorts
    whose masks were removed without them (dropped before submitting, or submitted and never
    answered); ``min_cohort_sites``: the fewest updates summed into one version (None: no cohort
    applied); ``plain_versions``: versions not made from a cohort (0 when every version was masked).
    """
    block: dict[str, Any] = {
        "enabled": on,
        "min_sites": min_sites if on else None,
        "cohorts": 0,
        "cohorts_failed": 0,
        "dropouts_recovered": 0,
        "min_cohort_sites": None,
        "plain_versions": 0,
    }
    if not state_db.exists():
        return block
    db = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True)
    try:
        lineages = [json.loads(r[0]) for r in db.execute("SELECT lineage FROM checkpoints WHERE version > 0")]
        row = db.execute("SELECT value FROM meta WHERE key = 'secagg_cohorts_failed'").fetchone()
    finally:
        db.close()
    cohorts = [lin for lin in lineages if lin.get("strategy") == "fedbuff-secagg"]
    block["cohorts"] = len(cohorts)
    block["cohorts_failed"] = int(row[0]) if row else 0
    block["dropouts_recovered"] = sum(len(c.get("dropped", [])) + len(c.get("silent", [])) for c in cohorts)
    block["min_cohort_sites"] = min((len(c["updates"]) for c in cohorts), default=None)
    block["plain_versions"] = len(lineages) - len(cohorts)
    return block


def check(block: dict[str, Any] | None) -> bool | None:
    """The claim: every version came from a masked cohort of at least ``min_sites`` (None: not enabled)."""
    if not block or not block.get("enabled"):
        return None
    return (
        block["cohorts"] >= 1
        and block["plain_versions"] == 0
        and block["min_cohort_sites"] is not None
        and block["min_cohort_sites"] >= block["min_sites"]
    )


def markdown_line(block: dict[str, Any] | None) -> str:
    """One sentence for report.md's "Aggregator and wire"."""
    if not block or not block.get("enabled"):
        return "- Secure aggregation: off (the aggregator opened each update)."
    return (
        f"- Secure aggregation: {block['cohorts']} cohorts became versions (at least {block['min_cohort_sites']} "
        f"masked updates each; the aggregator saw only their sums), {block['cohorts_failed']} failed cleanly with "
        f"receipts, {block['dropouts_recovered']} dropped or silent members' masks were removed by their peers' "
        f"shares; versions not from a cohort: {block['plain_versions']}."
    )


def note(on: bool, n_sites: int) -> str:
    """The report's note on how versions were made in this run."""
    if not on:
        why = "--no-secure-aggregation was given" if n_sites >= MIN_SITES else f"{n_sites} sites are too few"
        return f"Secure aggregation: off ({why}); the aggregator opened each update and reduced its FedBuff buffer."
    s = SECAGG_TABLE
    return (
        "Secure aggregation (on: `[strategy] secure_aggregation = true`, `secure_aggregation = true` in each "
        "site.toml): instead of a FedBuff buffer of K updates, each version is the sum of one cohort, formed from "
        f"the sites online and in no open cohort (at least {MIN_SITES}; the aggregator waits up to "
        f"{s['gather_s']:g} s for more). Every member trains on the cohort's base version and sends its DP delta "
        "masked (Bonawitz et al. 2017): the aggregator, even with its own key, sees only the sum, applied as "
        "FedBuff's (1/K) sum with K = the members who submitted and one staleness for all. A cohort closes when "
        f"every member submitted, when every member yet to submit is offline, or after {s['deadline_s']:g} s; a "
        f"cohort without enough submissions or answers within {s['unmask_timeout_s']:g} s fails with signed "
        "receipts (the one open when the demo stops its sites fails that way too). The split study simulates "
        "plain FedBuff with the same K, staleness weighting and DP rounds: the same update rule on the same "
        "deltas, without the masks (which cancel exactly; the fixed-point sum is within n²R/(2³¹−1−n) per coordinate)."
    )
