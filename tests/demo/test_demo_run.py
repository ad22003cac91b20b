"""``fedline demo`` end to end, shortened: real Mosquitto, real processes, a report.

Two runs: the bundled AI4I file (four sites, one cut off for a while) with fewer rows and
versions, and the bring-your-own-data path on a regression CSV made here from a formula plus
noise, whose held-out rows are whole machines (--group-column). Each asserts what the
report must show, and runs a 2-split study; the full-size claims (every site's served
model no worse than local-only, the smallest site ahead at p < 0.05, over 10 splits) are
for the default runs (`make demo`, `make demo-cmapss`), whose figures are in their reports
and in README.md.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from broker_bridge.mosquitto import mosquitto_binary

ROOT = Path(__file__).resolve().parents[2]


def assert_served_is_what_the_line_loads(tmp_path: Path, rep: dict, site: dict) -> None:
    """metric_served / served_kind are those of the ONNX the site's line hot-reloads, scored here again."""
    import onnxruntime as ort

    from edge.inference.model_dir import read_model, read_pointer
    from fedline.demo.data import load_demo_data
    from models.metrics import rmse, roc_auc

    d = tmp_path / "run" / "sites" / site["site"] / "models"
    ptr = read_pointer(d)
    assert ptr is not None and ptr.meta["served"]["kind"] == site["served_kind"]
    assert site["served_kind"] in ("local", "global", "fine_tuned", "blend")
    from edge.personal import RULES

    served = ptr.meta["served"]
    assert served["rule"] in RULES  # the line's status names the rule that decided
    assert site["served_weight"] == served["weight"]  # report.json names the blend's weight, None otherwise
    if site["served_kind"] == "blend":  # one ONNX of both models: the weight and partner are in its pointer
        assert 0 < served["weight"] < 1 and served["blend_of"] in ("global", "fine_tuned")
    else:
        assert served["weight"] is None
    v = served["validation_metric"]
    if served["rule"] != "too_small_folds_blended":  # the folds' blend weight may differ from validation's best
        assert v is None or v == pytest.approx(served["candidates"][site["served_kind"]])
    src = rep["data"]
    data = load_demo_data(None if "ai4i2020" in src["source"] else src["source"], **rep["load"])
    s = data.site(site["site"])
    sess = ort.InferenceSession(read_model(d, ptr), providers=["CPUExecutionProvider"])
    pred = sess.run(["y"], {"x": data.normalise(s.x_test)})[0].ravel()
    got = roc_auc(s.y_test, pred) if rep["metric"] == "roc_auc" else rmse(s.y_test, data.untarget(pred))
    assert got == pytest.approx(site["metric_served"], abs=1e-6)


def run_demo(tmp_path: Path, *args: str, timeout: float = 800) -> tuple[dict, str]:
    if mosquitto_binary() is None:
        pytest.fail("this test needs the mosquitto broker: apt-get install mosquitto")
    report = tmp_path / "report"
    cmd = [
        sys.executable,
        "-m",
        "fedline.cli",
        "demo",
        "--no-progress",
        "--run-dir",
        str(tmp_path / "run"),
        "--report",
        str(report),
        *args,
    ]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert (report / "report.json").exists(), out[-3000:]
    return json.loads((report / "report.json").read_text()), out


@pytest.mark.broker
@pytest.mark.timeout(
    900
)  # the demo's --timeout bounds its federation; baselines and study add minutes on a busy machine
def test_shortened_ai4i_demo(tmp_path):
    rep, out = run_demo(
        tmp_path,
        "--max-rows-per-site",
        "400",
        "--versions",
        "3",
        "--cut-after-version",
        "1",
        "--cut-seconds",
        "3",
        "--round-seconds",
        "1.5",
        "--timeout",
        "240",  # bounds the federation; it ends at its versions, so a quiet run never waits it out
        "--splits",
        "2",
    )
    assert "private Mosquitto" in out and "(TLS)" in out
    run = tmp_path / "run"  # over TLS, with client ids bound to usernames and a user per service
    assert "use_username_as_clientid true" in (run / "broker" / "mosquitto.conf").read_text()
    assert 'url = "mqtts://' in (run / "sites" / "M" / "site.toml").read_text()
    assert 'username = "M.line"' in (run / "sites" / "M" / "line.toml").read_text()
    assert rep["task"] == "classification" and rep["metric"] == "roc_auc"
    assert [s["site"] for s in rep["sites"]] == ["L1", "L2", "M", "H"]  # L's rows run as two plants
    assert rep["model_versions"] >= 3
    assert rep["raw_records_on_wire"] == 0 and rep["audit"]["messages"] > 20
    checks = rep["checks"]
    assert checks["no_raw_records_on_wire"] and checks["epsilon_within_budget"]
    assert checks["intermittent_site_accounted"], json.dumps(rep["sites"], indent=1)
    m = next(s for s in rep["sites"] if s["intermittent"])
    assert m["site"] == "L2" and rep["intermittent"]["cut_at"] is not None and rep["intermittent"]["restored_at"]
    for s in rep["sites"]:
        assert s["updates_sent"] >= 1 and s["bytes_sent"] > 0 and 0 < s["epsilon"] <= s["epsilon_budget"]
        assert s["predictions"] > 0  # the line inference scored the PLC's rows
        assert_served_is_what_the_line_loads(tmp_path, rep, s)
        # what the agent held at the end, read from its dataset: at most what it was sent, most of it
        n_train, n_val = s["rows_stored"]
        assert 0.9 * s["rows_train"] <= n_train + n_val <= s["rows_train"]
        assert_plc_started_after_its_agent(tmp_path / "run" / "logs", s["site"])
    h = next(s for s in rep["sites"] if s["site"] == "H")  # 320 training rows, 64 held out with 1-2 failures
    # too small to decide, and 5-ish training failures (< 30): its training folds join the evidence (edge/unit_folds)
    assert "too small" in h["served"]["reason"] and h["served"]["rule"].startswith("too_small_folds_")
    assert "5 training folds + validation" in h["served"]["reason"]
    assert rep["metric_central"] > 0.75  # the pooled rows (no DP) do predict failures: the yardstick is real
    assert rep["bytes_on_wire"] > sum(s["bytes_sent"] for s in rep["sites"])
    assert rep["updates"]["applied"] + rep["updates"]["stale_dropped"] >= 6
    assert [h["version"] for h in rep["history"]] == sorted({h["version"] for h in rep["history"]})
    assert (tmp_path / "report" / "metric_per_version.png").stat().st_size > 1000
    assert "## Claims" in (tmp_path / "report" / "report.md").read_text()
    study = rep["split_study"]  # the comparison repeated in-process on 2 splits, M missing its cut-off rounds
    assert study["splits"] == 2 and [r["split_seed"] for r in study["per_split"]] == [0, 1]
    first, end = study["absent_rounds"]["L2"]
    assert (first, end) == (rep["intermittent"]["version_at_cut"], rep["intermittent"]["version_at_restore"])
    for r in study["per_split"]:
        assert set(r["sites"]) == {"L1", "L2", "M", "H"}
        for v in r["sites"].values():
            assert 0 < v["epsilon"] <= 8.0 and v["served_kind"] in ("local", "global", "fine_tuned", "blend")
            # the served model is one of the three candidates: its score is theirs when it is local or global
            if v["served_kind"] in ("local", "global"):
                assert v["served"] == pytest.approx(v["local" if v["served_kind"] == "local" else "federated"])
    rules = study["sites"]["H"]["served_rules"]  # too few validation failures to decide: the folds decided
    assert sum(rules.values()) == 2 and set(rules) <= {"too_small_folds_kept_local", "too_small_folds_blended"}
    for r in study["per_split"]:  # on its folds H serves the 0.75 blend (fold_blend_weights) or keeps local-only
        h_split = r["sites"]["H"]
        blended = h_split["served_rule"] == "too_small_folds_blended"
        # its log-odds share: 0.75 matched to the two parts' spreads on the pool (edge/blend.py spread_matched)
        assert h_split["served_kind"] == ("blend" if blended else "local")
        assert (0 < h_split["served_weight"] < 1) if blended else h_split["served_weight"] is None
        if not blended:
            assert h_split["served"] == pytest.approx(h_split["local"])
    # two splits cannot show a gain at p < 0.05 (the best a sign or signed-rank test of 2 says is p = 1/4)
    assert study["sites"]["H"]["served_sign_test_p"] >= 0.25 and checks["smallest_site_served_gains"] is False
    assert "split study" in out
    assert_secure_aggregation(tmp_path / "run" / "logs" / "aggregator.log", rep)


def assert_plc_started_after_its_agent(logs: Path, site: str) -> None:
    """The PLC serves its live rows on its own clock from its start: it must start once its agent is up (the
    agent's "edge.starting" comes before it connects and says "online"), or the rows it serves meanwhile are lost."""
    stamp = lambda line: line.split()[0]  # ISO 8601 UTC, same format in both logs: compares as text
    agent = next(stamp(x) for x in (logs / f"edge-{site}.log").read_text().splitlines() if "edge.starting" in x)
    plc = next(stamp(x) for x in (logs / f"plc-{site}.log").read_text().splitlines() if "plc_sim.listening" in x)
    assert plc > agent, (site, plc, agent)


def assert_secure_aggregation(agg_log: Path, rep: dict) -> None:
    """Every version was a masked cohort's sum, and the report's figures are the aggregator's own events.

    The block is read from the aggregator's SQLite store; here each figure is counted again from its
    log (one ``secagg.cohort_applied`` event per cohort sum, ``secagg.cohort_failed`` per failure).
    """
    sa = rep["secure_aggregation"]
    assert sa["enabled"] and sa["min_sites"] == 3 and rep["checks"]["every_version_from_a_secure_cohort"]
    applied, failed = [], 0
    for line in agg_log.read_text().splitlines():
        if "secagg.cohort_applied" in line:
            f = dict(re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", line.split("secagg.cohort_applied", 1)[1]))
            lists = {k: ast.literal_eval(f[k].strip('"')) for k in ("dropped", "silent")}
            applied.append((int(f["version"]), int(f["survivors"]), lists["dropped"], lists["silent"]))
        failed += "secagg.cohort_failed" in line
    assert [a[0] for a in applied] == list(range(1, rep["model_versions"] + 1))  # no plain version
    assert sa["cohorts"] == len(applied) == rep["model_versions"] and sa["plain_versions"] == 0
    assert sa["cohorts_failed"] == failed
    assert sa["dropouts_recovered"] == sum(len(d) + len(s) for _, _, d, s in applied)
    assert sa["min_cohort_sites"] == min(a[1] for a in applied) and 3 <= sa["min_cohort_sites"] <= 4
    # the federation kept publishing while L2 was away: cohorts of the others made versions
    assert rep["intermittent"]["version_at_restore"] > rep["intermittent"]["version_at_cut"]
    assert "Secure aggregation:" in (agg_log.parents[2] / "report" / "report.md").read_text()


@pytest.mark.broker
@pytest.mark.timeout(900)
def test_bring_your_own_regression_csv_reports_rmse(tmp_path):
    rng = np.random.default_rng(7)
    path = tmp_path / "line-speed.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["plant", "machine", "feed", "temp", "load", "energy"])
        for i in range(900):
            plant = ["north", "south"][i % 2] if i < 700 else "south"
            machine = i // 30  # 30 machines of 30 consecutive rows; each has its own offset
            feed, temp, load = rng.uniform(0, 10), rng.uniform(20, 80), rng.uniform(0, 1)
            energy = 3.0 * feed + 0.5 * temp + 20.0 * load * load + (machine % 5) + rng.normal(0, 1.0)
            w.writerow([plant, machine, f"{feed:.3f}", f"{temp:.2f}", f"{load:.4f}", f"{energy:.3f}"])
    rep, _out = run_demo(
        tmp_path,
        "--csv",
        str(path),
        "--site-column",
        "plant",
        "--label",
        "energy",
        "--group-column",
        "machine",
        "--features",
        "feed,temp,load",
        "--task",
        "regression",
        "--versions",
        "3",
        "--cut-after-version",
        "1",
        "--cut-seconds",
        "3",
        "--round-seconds",
        "1.5",
        "--timeout",
        "240",  # bounds the federation; it ends at its versions, so a quiet run never waits it out
        "--splits",
        "2",
    )
    assert rep["task"] == "regression" and rep["metric"] == "rmse"
    # two sites cannot form a cohort (a cohort of 2 reveals each update to the other): secure aggregation is off
    assert rep["secure_aggregation"]["enabled"] is False and rep["checks"]["every_version_from_a_secure_cohort"] is None
    assert {s["site"]: s["rows"] for s in rep["sites"]} == {"south": 550, "north": 350}
    y = np.array([float(r["energy"]) for r in csv.DictReader(path.open())])
    for s in rep["sites"]:
        for key in ("metric_local", "metric_federated", "metric_central"):
            assert s[key] is not None and math.isfinite(s[key]) and s[key] > 0, (key, s)
        assert s["metric_central"] < y.std()  # the central reference learns the formula
    assert rep["raw_records_on_wire"] == 0
    assert rep["checks"]["intermittent_site_accounted"]
    for s in rep["sites"]:  # held-out machines: none of their rows reached the site's processes
        assert_served_is_what_the_line_loads(tmp_path, rep, s)
        d = tmp_path / "run" / "sites" / s["site"]
        given = {r["machine"] for name in ("history.csv", "live.csv") for r in csv.DictReader((d / name).open())}
        site_rows = [r for r in csv.DictReader(path.open()) if r["plant"] == s["site"]]
        held = {r["machine"] for r in site_rows} - given
        assert held and sum(r["machine"] in held for r in site_rows) == s["rows_test"]
    assert "units " in (tmp_path / "report" / "report.md").read_text()  # the report names the held-out machines
    pooled = rep["split_study"]["pooled"]  # judged like the other accuracy claims: on the study's splits
    per = [r["pooled"] for r in rep["split_study"]["per_split"]]
    assert pooled["mean_federated"] == pytest.approx(sum(p["federated"] for p in per) / len(per))
    assert rep["checks"]["federation_learns"] is (pooled["mean_federated"] < pooled["mean_label_std"])
    assert "RMSE (lower is better)" in (tmp_path / "report" / "report.md").read_text()
    for r in rep["split_study"]["per_split"]:  # RMSE in the label's unit, for both models
        for v in r["sites"].values():  # local-only learns the formula (as in the run); 3 versions are few
            assert 0 < v["local"] < y.std() and 0 < v["federated"] and math.isfinite(v["federated"])
