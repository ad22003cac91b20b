"""report.json / report.md / PNG from a report dict, and the four must-show checks."""
from __future__ import annotations

import copy
import json

import pytest

from fedline.demo.report import compute_checks, write_report


def _site(name, rows, local, fed, eps=5.0, sent=4, applied=4, stale=0, pending=0, intermittent=False):
    return {"site": name, "key": name, "rows": rows, "rows_train": rows * 4 // 5, "rows_test": rows // 5,
            "metric_local": local, "metric_federated": fed, "metric_personalised": None, "metric_central": 0.95,
            "epsilon": eps, "epsilon_budget": 8.0, "delta": 1e-5, "updates_sent": sent, "bytes_sent": 1000,
            "receipts": {"applied": applied, "stale": stale, "rejected": 0, "buffered_pending": 0},
            "staleness_mean": 0.5, "staleness_max": 2, "outbox_pending": pending, "intermittent": intermittent}


@pytest.fixture
def report():
    return {
        "task": "classification", "metric": "roc_auc",
        "data": {"source": "x.csv", "label": "y", "features": ["a", "b"], "site_column": "s", "ranges_from_data": False},
        "sites": [_site("L", 6000, 0.94, 0.90), _site("M", 3000, 0.9, 0.91, sent=6, applied=4, stale=2,
                                                        intermittent=True),
                  _site("H", 1000, 0.85, 0.91)],
        "metric_central": 0.95, "updates": {"applied": 12, "stale_dropped": 2, "rejected": 0},
        "model_versions": 5, "bytes_on_wire": 123456, "raw_records_on_wire": 0,
        "audit": {"messages": 10, "bytes": 5000, "raw_records": 0, "messages_with_records": [], "by_kind": {}},
        "duration_s": 80.0, "broker": "test", "notes": ["a note"],
        "history": [{"version": v, "t": v, "metrics": {"L": 0.5 + v / 20, "M": 0.5, "H": float("nan")}}
                    for v in range(6)],
    }


def test_writes_json_markdown_and_png(tmp_path, report):
    paths = write_report(report, tmp_path / "out")
    doc = json.loads(paths["json"].read_text())
    for key in ("task", "metric", "sites", "metric_central", "updates", "model_versions", "bytes_on_wire",
                "raw_records_on_wire", "duration_s"):
        assert key in doc
    for key in ("site", "rows", "metric_local", "metric_federated", "epsilon", "delta", "updates_sent", "bytes_sent"):
        assert key in doc["sites"][0]
    assert doc["updates"] == {"applied": 12, "stale_dropped": 2, "rejected": 0}
    assert doc["history"][0]["metrics"]["H"] is None  # NaN is not JSON: written as null
    md = paths["md"].read_text()
    assert "| M (intermittent) |" in md and "Raw records seen on the wire: **0**" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(doc["checks"][k] for k in ("federated_beats_local_on_smallest_site", "epsilon_within_budget",
                                          "no_raw_records_on_wire", "intermittent_site_accounted"))


def test_each_check_can_fail(report):
    r = copy.deepcopy(report)
    r["sites"][2]["metric_federated"] = 0.80  # H: worse than its local 0.85
    r["sites"][0]["epsilon"] = 8.5
    r["raw_records_on_wire"] = 1
    r["sites"][1]["outbox_pending"] = 1
    c = compute_checks(r)
    assert c["smallest_site"] == "H"
    assert c == {**c, "federated_beats_local_on_smallest_site": False, "epsilon_within_budget": False,
                 "no_raw_records_on_wire": False, "intermittent_site_accounted": False}
    r2 = copy.deepcopy(report)
    r2["sites"][1]["receipts"]["stale"] = 1  # one of six updates has no final verdict
    assert compute_checks(r2)["intermittent_site_accounted"] is False


def test_rmse_lower_is_better(report):
    r = copy.deepcopy(report)
    r["metric"] = "rmse"
    r["sites"][2].update(metric_local=2.0, metric_federated=1.5)
    assert compute_checks(r)["federated_beats_local_on_smallest_site"] is True
    r["sites"][2].update(metric_federated=2.5)
    assert compute_checks(r)["federated_beats_local_on_smallest_site"] is False


def _study(metric, pairs_h):
    """A split study whose smallest site H has these (local, federated) pairs."""
    from fedline.demo.splitstudy import summarise

    per_split = [{"L": {"local": 0.9, "federated": 0.8}, "H": {"local": loc, "federated": fed}} for loc, fed in pairs_h]
    return {"splits": len(pairs_h), "method": "test", "per_split": [{"split_seed": i, "sites": r}
                                                                   for i, r in enumerate(per_split)],
            "sites": summarise(metric, per_split)}


def test_split_study_check_and_section(tmp_path, report):
    r = copy.deepcopy(report)
    r["sites"][2]["metric_federated"] = 0.80  # this run: H loses to its local 0.85 ...
    r["split_study"] = _study("roc_auc", [(0.9, 0.93), (0.7, 0.88), (0.8, 0.85), (0.95, 0.94)])
    c = compute_checks(r)
    assert c["federated_beats_local_on_smallest_site"] is False  # ... which stays reported as it is
    assert c["federated_beats_local_on_smallest_site_across_splits"] is True  # 3 of 4, mean gain > 0
    h = r["split_study"]["sites"]["H"]
    assert h["federated_wins"] == 3 and h["mean_gain"] == pytest.approx((0.03 + 0.18 + 0.05 - 0.01) / 4)
    md = write_report(r, tmp_path / "out")["md"].read_text()
    assert "in this run: **NO**" in md and "federated ahead in 3 of 4" in md and "| H | 4 | 3 |" in md
    r["split_study"] = _study("roc_auc", [(0.9, 0.93), (0.7, 0.6), (0.8, 0.75)])  # 1 of 3: not shown
    assert compute_checks(r)["federated_beats_local_on_smallest_site_across_splits"] is False
    r["split_study"] = _study("roc_auc", [(0.9, 0.91), (0.7, 0.71), (0.8, 0.5)])  # 2 of 3 but mean gain < 0
    assert compute_checks(r)["federated_beats_local_on_smallest_site_across_splits"] is False
    del r["split_study"]
    assert compute_checks(r)["federated_beats_local_on_smallest_site_across_splits"] is None


def test_split_study_rmse_gain_is_the_drop_in_error():
    from fedline.demo.splitstudy import summarise

    s = summarise("rmse", [{"a": {"local": 2.0, "federated": 1.5}}, {"a": {"local": 1.0, "federated": 1.2}},
                           {"a": {"local": 3.0, "federated": float("nan")}}])["a"]
    assert s["splits"] == 2 and s["federated_wins"] == 1  # a NaN split (no positives held out) is left out
    assert s["mean_gain"] == pytest.approx((0.5 - 0.2) / 2)


def test_sign_test():
    from fedline.demo.splitstudy import sign_test_p

    assert sign_test_p(8, 10) == pytest.approx(56 / 1024)
    assert sign_test_p(0, 5) == 1.0 and sign_test_p(5, 5) == pytest.approx(1 / 32) and sign_test_p(0, 0) == 1.0


def test_long_stream_paragraph(tmp_path, report):
    """The report states each site's per-record ε and what the global-history accountant would have done."""
    report["long_stream"] = {"rounds": 1200, "every_s": 1000.0, "window_s": 50000.0, "batch_size": 64,
                             "epsilon_budget": 8.0, "per_record_epsilon": 4.06, "per_record_epsilon_at_half": 4.06,
                             "global_epsilon": 8.4, "global_stops_at_round": 1101, "rows_retired": 0}
    md = write_report(report, tmp_path / "out")["md"].read_text()
    assert "per-record ε / budget" in md
    assert "every row's ε is at most 4.06" in md and "stopped the site for good at round 1101" in md
    report["long_stream"]["global_stops_at_round"] = None
    md = write_report(report, tmp_path / "out2")["md"].read_text()
    assert "would not have stopped it within 1200 rounds" in md
