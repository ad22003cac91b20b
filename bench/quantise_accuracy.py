"""What int8 updates cost in accuracy: the demo's split study run twice, float32 and int8 updates.

The split study (:mod:`fedline.demo.splitstudy`) runs the demo's federation in one
process per train/test split (the edge's DP-SGD rounds, the aggregator's own
strategy with the demo's ``[strategy]`` table, each site's served model picked by
the edge's code) and scores every site on its held-out rows. Here it runs on split
seeds ``0..K-1`` once with float32 updates and once with every delta making the
int8 round trip (``[update] quantise = "int8"``, :mod:`broker_bridge.quantised`),
and reports per site the mean federated and served metric of each and their paired
difference (int8 minus float32; for ROC AUC, negative = int8 worse).

The DP noise is drawn fresh in every run, so a paired difference holds two runs'
noise as well as the rounding: the spread of the differences over the splits says
how much of the mean difference is noise.

Usage: ``python bench/quantise_accuracy.py --splits 5`` (table) or ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def study(splits: int, encoding: str) -> dict[str, Any]:
    from fedline.demo.data import load_demo_data
    from fedline.demo.runner import DemoOptions, _load_kwargs
    from fedline.demo.splitstudy import run_split_study

    opts = DemoOptions()  # the demo's defaults: AI4I, its sites, its tuning
    load = _load_kwargs(opts)
    metric = load_demo_data(**load).metric
    t0 = time.perf_counter()
    out = run_split_study(load, opts.tuning, opts.batch_fraction, metric, splits, encoding=encoding)
    out["wall_s"] = time.perf_counter() - t0
    out["metric"] = metric
    return out


def compare(f32: dict[str, Any], i8: dict[str, Any]) -> dict[str, Any]:
    """Per site: means of each run and the paired (same split) difference int8 - float32."""
    sites: dict[str, Any] = {}
    for site in f32["per_split"][0]["sites"]:
        row: dict[str, Any] = {}
        for kind in ("federated", "served"):
            a = [s["sites"][site][kind] for s in f32["per_split"]]
            b = [s["sites"][site][kind] for s in i8["per_split"]]
            pairs = [(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
            diffs = [y - x for x, y in pairs]
            n = len(diffs)
            mean = sum(diffs) / n if n else math.nan
            sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else math.nan
            row[kind] = {
                "float32_mean": sum(x for x, _ in pairs) / n if n else math.nan,
                "int8_mean": sum(y for _, y in pairs) / n if n else math.nan,
                "mean_diff": mean,
                "sd_diff": sd,
                "se_diff": sd / math.sqrt(n) if n > 1 else math.nan,
                "per_split_diff": diffs,
            }
        sites[site] = row
    return sites


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--splits", type=int, default=5, help="split seeds 0..K-1 (default 5)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    f32 = study(args.splits, "float32")
    i8 = study(args.splits, "int8")
    result = {
        "benchmark": "quantise_accuracy",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "splits": args.splits,
        "metric": f32["metric"],
        "wall_s": {"float32": f32["wall_s"], "int8": i8["wall_s"]},
        "sites": compare(f32, i8),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"split study, {args.splits} splits, {result['metric']} on each site's held-out rows: "
        "float32 updates against int8 updates (paired by split; diff = int8 - float32)"
    )
    head = f"{'site':>6} {'model':>10} {'float32':>8} {'int8':>8} {'mean diff':>10} {'sd':>7} {'se':>7}"
    print(head)
    print("-" * len(head))
    for site, row in result["sites"].items():
        for kind, r in row.items():
            print(
                f"{site:>6} {kind:>10} {r['float32_mean']:8.3f} {r['int8_mean']:8.3f} {r['mean_diff']:+10.4f} "
                f"{r['sd_diff']:7.4f} {r['se_diff']:7.4f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
