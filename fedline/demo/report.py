"""The demo's report: ``report.json`` (for machines), ``report.md`` (for people) and a PNG plot.

The JSON fields are the ones the issue lists (``task``, ``metric``, ``sites[]``,
``metric_central``, ``updates``, ``model_versions``, ``bytes_on_wire``,
``raw_records_on_wire``, ``duration_s``) plus ``checks``: the statements
the demo must show, each true or false, so a test or a CI job can read them,
and ``split_study`` (see :mod:`fedline.demo.splitstudy`) when it was run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedline.demo.metrics import better

METRIC_NAMES = {"roc_auc": "ROC AUC (higher is better)", "rmse": "RMSE (lower is better)"}


def _clean(v: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def compute_checks(report: dict[str, Any]) -> dict[str, Any]:
    """The statements the demo must show, from the figures in the report."""
    metric = report["metric"]
    sites = report["sites"]
    smallest = min(sites, key=lambda s: s["rows"])
    fed, loc = smallest.get("metric_federated"), smallest.get("metric_local")
    intermittent = [s for s in sites if s.get("intermittent")]
    study = (report.get("split_study") or {}).get("sites", {}).get(smallest["site"])
    return {
        "smallest_site": smallest["site"],
        "federated_beats_local_on_smallest_site": bool(
            fed is not None and loc is not None and math.isfinite(fed) and better(metric, fed, loc)),
        # the same statement over the split study's K splits: ahead in most of them and on average
        "federated_beats_local_on_smallest_site_across_splits": bool(
            study["splits"] and study["federated_wins"] > study["splits"] / 2 and study["mean_gain"] > 0)
        if study else None,
        "epsilon_within_budget": all(
            s.get("epsilon") is not None and s["epsilon"] <= s["epsilon_budget"] + 1e-9 for s in sites),
        "no_raw_records_on_wire": report["raw_records_on_wire"] == 0,
        "intermittent_site_accounted": all(
            s["updates_sent"] > 0 and s["updates_sent"] == s["receipts"]["applied"] + s["receipts"]["stale"]
            + s["receipts"]["buffered_pending"] + s["receipts"]["rejected"] and s["outbox_pending"] == 0
            for s in intermittent) if intermittent else None,
    }


def write_json(report: dict[str, Any], out: Path) -> Path:
    path = out / "report.json"
    path.write_text(json.dumps(_clean(report), indent=2) + "\n", encoding="utf-8")
    return path


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the story of the run in tables and sentences."""
    m = report["metric"]
    checks = report["checks"]
    small_site = min(report["sites"], key=lambda x: x["rows"])
    study = report.get("split_study")
    small_study = study["sites"].get(small_site["site"]) if study else None
    ok = lambda b: "yes ✅" if b else ("n/a" if b is None else "**NO** ❌")
    lines = [
        "# fedline demo report",
        "",
        f"Task: **{report['task']}** on `{report['data']['source']}` "
        f"(label `{report['data']['label']}`, features {', '.join(f'`{f}`' for f in report['data']['features'])}); "
        f"metric: {METRIC_NAMES[m]} on each site's held-out 20 %.",
        f"Broker: {report['broker']}. Duration {report['duration_s']:.0f} s, {report['model_versions']} model versions.",
        "",
        "## Must be shown",
        "",
        f"- Federated beats local-only on the smallest site ({checks['smallest_site']}), in this run: "
        f"{ok(checks['federated_beats_local_on_smallest_site'])} "
        f"({_fmt(small_site['metric_federated'])} against {_fmt(small_site['metric_local'])} on its held-out rows)"
        + ("" if checks['federated_beats_local_on_smallest_site'] is not False else
           " — a measured outcome, not a crash: one run is one draw of which few failures are held out "
           "(see the split study)"),
        *([f"- ... and over the split study's {study['splits']} train/test splits: "
           f"{ok(checks['federated_beats_local_on_smallest_site_across_splits'])} (federated ahead in "
           f"{small_study['federated_wins']} of {small_study['splits']}, mean gain {small_study['mean_gain']:+.3f}, "
           f"one-sided sign test p = {small_study['sign_test_p']:.3f})"] if small_study else []),
        f"- ε within budget for every site: {ok(checks['epsilon_within_budget'])}",
        f"- Raw records seen on the wire: **{report['raw_records_on_wire']}** "
        f"({ok(checks['no_raw_records_on_wire'])})",
        f"- Intermittent site's updates all accounted for (applied or stale, with a signed receipt, "
        f"outbox empty): {ok(checks['intermittent_site_accounted'])}",
        "",
        "## Per site",
        "",
        "| site | rows (train/test) | held-out positives | local-only | federated (global) | federated + own head | central | per-record ε / budget (δ) "
        "| updates sent | applied | stale | rejected | staleness mean / max | bytes sent |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["sites"]:
        r = s["receipts"]
        name = s["site"] + (" (intermittent)" if s.get("intermittent") else "")
        lines.append(
            f"| {name} | {s['rows']} ({s['rows_train']}/{s['rows_test']}) | {_fmt(s.get('test_positives'))} | "
            f"{_fmt(s['metric_local'])} | "
            f"{_fmt(s['metric_federated'])} | {_fmt(s.get('metric_personalised'))} | {_fmt(s['metric_central'])} | "
            f"{_fmt(s['epsilon'], 2)} / {_fmt(s['epsilon_budget'], 1)} ({s['delta']:.0e}) | {s['updates_sent']} | "
            f"{r['applied']} | {r['stale']} | {r['rejected']} | {_fmt(s.get('staleness_mean'), 2)} / "
            f"{_fmt(s.get('staleness_max'))} | {_bytes(s['bytes_sent'])} |")
    ls = report.get("long_stream")
    if ls:
        stop = ls["global_stops_at_round"]
        lines += ["", f"Over the life of a plant (simulated: rows at 1 Hz, a {ls['window_s']:g} s sliding window, a round "
                      f"every {ls['every_s']:g} s, batch {ls['batch_size']}, this demo's σ, δ and budget): after "
                      f"{ls['rounds']} rounds every row's ε is at most {ls['per_record_epsilon']:.2f} (half-way: "
                      f"{ls['per_record_epsilon_at_half']:.2f}), within the budget of {ls['epsilon_budget']:g}. One "
                      f"accountant over the site's whole history would be at {ls['global_epsilon']:.2f} and "
                      + (f"would have stopped the site for good at round {stop}." if stop else
                         f"would not have stopped it within {ls['rounds']} rounds.")]
    u = report["updates"]
    if m == "roc_auc":
        small = min(report["sites"], key=lambda x: x["rows"])
        p = small.get("test_positives")
        if p:
            lines += ["", f"How much one row decides: site {small['site']} has {p} failures among its "
                          f"{small['rows_test']} held-out rows, so one failure ranked below instead of above "
                          f"half of the normal rows moves its ROC AUC by {0.5 / p:.3f}. Differences smaller "
                          "than that are decided by a single machine event."]
    if study:
        lines += ["", f"## The split study: the same comparison over {study['splits']} train/test splits", "",
                  f"One run measures the comparison on one draw of held-out rows. Here it is repeated in-process on "
                  f"split seeds 0-{study['splits'] - 1} (seed 0 is this run's split): {study['method']}. "
                  "Gain is federated minus local-only in the metric's better direction.", "",
                  "| site | splits | federated ahead | mean local-only | mean federated | mean gain | sign test p |",
                  "|---|---|---|---|---|---|---|"]
        for site, st in study["sites"].items():
            lines.append(f"| {site} | {st['splits']} | {st['federated_wins']} | {_fmt(st['mean_local'])} | "
                         f"{_fmt(st['mean_federated'])} | {st['mean_gain']:+.3f} | {st['sign_test_p']:.3f} |")
        lines += ["", "Per split (local-only / federated): " + "; ".join(
            f"seed {r['split_seed']}: " + ", ".join(f"{site} {_fmt(v['local'])}/{_fmt(v['federated'])}"
                                                    for site, v in r["sites"].items())
            for r in study["per_split"]) + "."]
    lines += [
        "",
        f"Central model (pooled training rows, no DP) on the pooled held-out rows: {_fmt(report['metric_central'])}.",
        "",
        "## Aggregator and wire",
        "",
        f"- Updates applied {u['applied']}, stale-dropped {u['stale_dropped']}, rejected {u['rejected']}.",
        f"- Bytes on the wire (every party's TCP traffic to and from the broker, MQTT framing included): "
        f"{_bytes(report['bytes_on_wire'])}; payload bytes the broker carried (seen by the audit subscriber): "
        f"{_bytes(report['audit']['bytes'])} in {report['audit']['messages']} messages.",
        f"- Traffic audit: {report['audit']['messages']} messages searched for every record of every site "
        "(as text and as packed float32/float64, raw and normalised); records found: "
        f"**{report['raw_records_on_wire']}**.",
        "",
        "## How this run was set up",
        "",
    ]
    lines += [f"- {note}" for note in report.get("notes", [])]
    lines += ["", "![metric per version](metric_per_version.png)", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], out: Path) -> Path:
    """One panel per site: the global model's metric per version, against local-only and central."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = report["sites"]
    fig, axes = plt.subplots(1, len(sites), figsize=(4.2 * len(sites), 3.4), squeeze=False)
    for ax, s in zip(axes[0], sites):
        hist = [(h["version"], h["metrics"].get(s["site"])) for h in report["history"]]
        hist = [(v, x) for v, x in hist if x is not None and math.isfinite(x)]
        if hist:
            ax.plot([v for v, _ in hist], [x for _, x in hist], "o-", ms=3, label="federated (global)")
        for key, style, label in (("metric_local", "--", "local-only"), ("metric_central", ":", "central")):
            v = s.get(key)
            if v is not None and math.isfinite(v):
                ax.axhline(v, ls=style, color="grey" if key == "metric_local" else "black", label=label)
        ax.set_title(f"site {s['site']} ({s['rows']} rows)")
        ax.set_xlabel("model version")
        ax.set_ylabel(report["metric"])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = out / "metric_per_version.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """Write all three files into ``out`` (created); the checks are computed here."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report["checks"] = compute_checks(report)
    paths = {"json": write_json(report, out)}
    md = out / "report.md"
    md.write_text(render_markdown(report), encoding="utf-8")
    paths["md"] = md
    paths["png"] = plot(report, out)
    return paths
