"""What the aggregator's start costs: CPU and peak memory from the process's start to ready, in fresh processes.

Each run is a fresh ``fedline aggregator`` process (as deployed: ``python -m fedline.cli aggregator``) against a
real Mosquitto, for a federation of ``--sites`` enrolled sites (their grants are part of the start) and a model of
about ``--params`` shared parameters (``bench/scale.py``'s federation and model). A small wrapper records, inside
the process, its CPU seconds (``time.process_time``), its peak RSS (``VmHWM``) and the collector's work at each
event the aggregator logs on the way:

- ``started``: the ``aggregator.started`` event (the core loaded, subscribed, the sites' key grants published);
- ``published``: the first ``model.published`` (the current version's weights, ONNX and signed manifest on the
  broker: the federation can train). **CPU to ready** is the CPU at ``published``.

Two kinds of start, each in its own fresh process: ``first`` (a new state directory: version 0 is built from the
seed) and ``restart`` (the same state directory again: the checkpoint is read back).

``--tree PATH`` (repeatable) runs the same measurement on other checkouts of the repository (e.g. ``git archive
<commit> | tar -x -C /tmp/base``), interleaved run by run (A B B A ...), so each ratio between trees is measured in
the same run on a shared, noisy machine; the medians and the per-pair ratios are reported. The first round of runs
is a warm-up (page cache, the broker's retained messages) and is not counted.

Usage: ``python bench/aggregator_start.py --tree /tmp/base --tree . --repeats 5 [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from fedline.testing.bench_trees import load_script, print_report, tree_label  # noqa: E402 (after the path fix above)

STAGES = ("aggregator.resumed", "aggregator.bounds", "mqtt.connected", "aggregator.started", "model.published")

# Runs inside the aggregator's process, before fedline.cli is imported: wraps fedline.logs.event (every module
# imports it by name after this) to note the process's CPU, peak RSS and the collector's counts at each stage.
WRAPPER = r"""
import gc, json, os, sys, time
out_path, argv = sys.argv[1], sys.argv[2:]
STAGES = set(json.loads(os.environ["FEDLINE_BENCH_STAGES"]))
import fedline.logs as logs
_event = logs.event
seen = {}

def _status():
    got = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmHWM:", "VmRSS:")):
                got[line.split(":")[0]] = int(line.split()[1]) / 1024
    return got

def event(logger, name, level=20, **fields):
    _event(logger, name, level, **fields)
    if name in STAGES and name not in seen:
        st = _status()
        seen[name] = {"cpu_s": time.process_time(), "hwm_mb": st.get("VmHWM"), "rss_mb": st.get("VmRSS"),
                      "frozen": gc.get_freeze_count(), "collections": [s["collections"] for s in gc.get_stats()],
                      "torch": "torch" in sys.modules, "onnx": "onnx" in sys.modules}
        with open(out_path + ".tmp", "w") as fh:
            json.dump(seen, fh)
        os.replace(out_path + ".tmp", out_path)

logs.event = event
from fedline.cli import main
sys.exit(main(argv))
"""


def _scale() -> Any:
    return load_script(ROOT / "bench" / "scale.py", "bench_scale")


def config_for(base_cfg: Path, state_dir: Path) -> Path:
    """The scale federation's aggregator TOML with its own state directory."""
    from fedline.demo.workspace import write_toml

    doc = tomllib.loads(base_cfg.read_text())
    doc["aggregator"]["state_dir"] = str(state_dir)
    return write_toml(state_dir.parent / f"{state_dir.name}.toml", doc)


def one_start(tree: Path, cfg: Path, out: Path, timeout: float) -> dict[str, Any]:
    """Start ``fedline aggregator`` from ``tree`` and stop it once it has published; its stages."""
    env = dict(
        os.environ,
        PYTHONPATH=str(tree),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        FEDLINE_BENCH_STAGES=json.dumps(STAGES),
    )
    out.unlink(missing_ok=True)
    log = out.with_suffix(".log").open("wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, str(out), "aggregator", "--config", str(cfg)],
        cwd=str(tree),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        while True:
            if out.exists() and "model.published" in (got := json.loads(out.read_text())):
                got["wall_s"] = time.monotonic() - t0
                return got
            if proc.poll() is not None:
                raise RuntimeError(f"the aggregator exited: {out.with_suffix('.log').read_text()[-3000:]}")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"no model.published within {timeout} s")
            time.sleep(0.05)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def summarise(runs: list[dict[str, Any]], trees: list[str]) -> dict[str, Any]:
    """Medians per tree and kind, and per-pair ratios of each tree against the first (same round)."""
    out: dict[str, Any] = {}
    for kind in ("first", "restart"):
        per: dict[str, Any] = {}
        for t in trees:
            rs = [r for r in runs if r["tree"] == t and r["kind"] == kind and not r["warmup"]]
            if not rs:
                continue
            per[t] = {
                "runs": len(rs),
                "cpu_ready_s": [round(r["stages"]["model.published"]["cpu_s"], 3) for r in rs],
                "cpu_started_s": [round(r["stages"]["aggregator.started"]["cpu_s"], 3) for r in rs],
                "median_cpu_ready_s": statistics.median(r["stages"]["model.published"]["cpu_s"] for r in rs),
                "median_cpu_started_s": statistics.median(r["stages"]["aggregator.started"]["cpu_s"] for r in rs),
                "median_wall_ready_s": statistics.median(r["stages"]["wall_s"] for r in rs),
                "median_hwm_ready_mb": statistics.median(r["stages"]["model.published"]["hwm_mb"] for r in rs),
                "collections_ready": rs[-1]["stages"]["model.published"]["collections"],
                "frozen_ready": rs[-1]["stages"]["model.published"]["frozen"],
            }
            if t != trees[0]:
                ratios = []
                for r in rs:
                    base = [
                        b
                        for b in runs
                        if b["tree"] == trees[0] and b["kind"] == kind and b["round"] == r["round"] and not b["warmup"]
                    ]
                    if base:
                        ratios.append(
                            r["stages"]["model.published"]["cpu_s"] / base[0]["stages"]["model.published"]["cpu_s"]
                        )
                per[t]["cpu_ready_ratio_vs_first_tree"] = [round(x, 3) for x in ratios]
                per[t]["median_cpu_ready_ratio"] = statistics.median(ratios) if ratios else None
        out[kind] = per
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", help="a checkout of the repository to run (repeatable; default: this)")
    ap.add_argument("--repeats", type=int, default=5, help="counted rounds (each tree, each kind of start)")
    ap.add_argument("--sites", type=int, default=1000)
    ap.add_argument("--params", type=int, default=100_000)
    ap.add_argument("--timeout", type=float, default=180.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    trees = [Path(t).resolve() for t in (args.tree or [str(ROOT)])]
    labels = [f"{i}:{tree_label(t)}" for i, t in enumerate(trees)]
    scale = _scale()
    from broker_bridge.mosquitto import MosquittoProcess

    load_before = os.getloadavg()[0]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedline-agg-start-") as tmp:
        root = Path(tmp)
        sites = scale.site_ids(args.sites)
        scale.raise_fd_limit()
        broker = MosquittoProcess(
            root / "broker", federation=scale.FEDERATION, sites=sites, max_connections=args.sites + 64
        ).start()
        try:
            base_cfg = scale.write_federation(root, args.sites, args.params, broker, scale.buffer_size_for(args.sites))
            for rnd in range(args.repeats + 1):
                order = list(range(len(trees)))
                if rnd % 2:
                    order.reverse()  # A B, B A, A B ...: neither tree always runs first
                for i in order:
                    state = root / f"state-{rnd}-{i}"
                    cfg = config_for(base_cfg, state)
                    for kind in ("first", "restart"):
                        got = one_start(trees[i], cfg, root / f"run-{rnd}-{i}-{kind}.json", args.timeout)
                        runs.append({"tree": labels[i], "kind": kind, "round": rnd, "warmup": rnd == 0, "stages": got})
                        if not args.json:
                            p = got["model.published"]
                            print(
                                f"round {rnd}{' (warm-up)' if rnd == 0 else ''} {labels[i]:>14} {kind:>7}: CPU to "
                                f"started {got['aggregator.started']['cpu_s']:.2f} s, to published {p['cpu_s']:.2f} s, "
                                f"wall {got['wall_s']:.2f} s, peak RSS {p['hwm_mb']:.0f} MB, frozen {p['frozen']}, "
                                f"collections {p['collections']}",
                                flush=True,
                            )
        finally:
            broker.stop()
    doc = {
        "benchmark": "aggregator_start",
        "sites": args.sites,
        "params": args.params,
        "trees": labels,
        "summary": summarise(runs, labels),
        "runs": runs,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print_report(doc, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
