"""What an edge's start costs: CPU from the process's start to its first sealed update, three edges starting together.

The federation is ``bench/e2e.py``'s (AI4I sites L/M/H, the MLP 5-32-32-1, DP-SGD, the demo's FedBuff, ONNX
publishing on, a real Mosquitto), fresh for every round: a ``fedline aggregator`` is started and waits until it has
published version 0; then the three sites' ``fedline edge`` processes are started together (as deployed: ``python
-m fedline.cli edge``), on the same two cores, as in the chain. A small wrapper records, inside each edge, its CPU
seconds (``time.process_time``, every thread) and the modules loaded at:

- ``start``: the ``edge.start_cost`` event (imports, the agent built, ``edge.trainer.preload``);
- ``first update``: its first ``update.sealed`` (version 0 adopted, the backlog read, the ledger's check, one
  DP-SGD round, the update sealed): **CPU to the first update**.

and the bench notes the wall time from the edges' start until the third site's first update is sealed (what
FedBuff's K = 3 waits for before version 1: the part of ``bench/e2e.py``'s chain that the warm plain loop does
not pay). Everything is stopped once all three have sealed one.

``--tree PATH`` (repeatable) runs other checkouts of the repository (e.g. ``git archive <commit> | tar -x -C
/tmp/base``) interleaved round by round (A B, B A, ...), so each ratio between trees is of neighbours on a shared,
noisy machine; round 0 is a warm-up (page cache) and is not counted. CPU seconds move less with the machine's
other load than wall times do; read the ratios.

Usage: ``python bench/edge_start.py [--tree /tmp/base --tree .] [--repeats 3] [--json]``.
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from fedline.testing.bench_trees import load_script, print_report, tree_label  # noqa: E402 (after the path fix above)

STAGES = {"edge.start_cost": "start", "update.sealed": "first_update"}
HEAVY = ("torch", "torch._dynamo", "torch.distributed.tensor", "sympy", "scipy.special", "onnx", "opacus.optimizers")

# Runs inside each edge's process, before fedline.cli is imported: wraps fedline.logs.event (every module imports
# it by name after this) to note the process's CPU and what it has imported at each stage, the first time.
WRAPPER = r"""
import json, os, sys, time
out_path, argv = sys.argv[1], sys.argv[2:]
STAGES = json.loads(os.environ["FEDLINE_BENCH_STAGES"])
HEAVY = json.loads(os.environ["FEDLINE_BENCH_HEAVY"])
import fedline.logs as logs
_event = logs.event
seen = {}

def event(logger, name, level=20, **fields):
    _event(logger, name, level, **fields)
    if name in STAGES and STAGES[name] not in seen:
        seen[STAGES[name]] = {"cpu_s": time.process_time(), "at": time.time(),
                              "loaded": [m for m in HEAVY if m in sys.modules]}
        with open(out_path + ".tmp", "w") as fh:
            json.dump(seen, fh)
        os.replace(out_path + ".tmp", out_path)

logs.event = event
from fedline.cli import main
sys.exit(main(argv))
"""


def _e2e() -> Any:
    return load_script(ROOT / "bench" / "e2e.py", "bench_e2e")


def _env(tree: Path) -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=str(tree),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        FEDLINE_BENCH_STAGES=json.dumps(STAGES),
        FEDLINE_BENCH_HEAVY=json.dumps(HEAVY),
    )


def _wait(cond: Any, what: str, procs: list[subprocess.Popen], timeout: float) -> None:
    t0 = time.monotonic()
    while not cond():
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a process exited while waiting for {what}")
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"no {what} within {timeout} s")
        time.sleep(0.02)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def one_round(e2e: Any, data: Any, tree: Path, root: Path, timeout: float) -> dict[str, Any]:
    """A fresh federation: the aggregator to version 0, then the three edges together to their first updates."""
    from broker_bridge.mosquitto import MosquittoProcess

    sites = [s.site for s in data.sites]
    broker = MosquittoProcess(root / "broker", federation="bench", sites=sites).start()
    procs: list[subprocess.Popen] = []
    try:
        (root / "broker" / "credentials").mkdir(exist_ok=True)
        paths = e2e.write_configs(data, root, {n: broker.url for n in ["aggregator", *sites]})
        agg_log = root / "aggregator.log"
        with agg_log.open("wb") as fh:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "fedline.cli", "aggregator", "--config", str(paths["aggregator"])],
                    cwd=paths["aggregator"].parent,
                    env=_env(tree),
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        _wait(lambda: b"model.published" in agg_log.read_bytes(), "version 0", procs, timeout)
        outs = {s: root / f"edge-{s}.json" for s in sites}
        t0 = time.time()
        for s in sites:
            with (root / f"edge-{s}.log").open("wb") as fh:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", WRAPPER, str(outs[s]), "edge", "--config", str(paths[s])],
                        cwd=paths[s].parent,
                        env=_env(tree),
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

        def all_sealed() -> bool:
            return all(o.exists() and "first_update" in json.loads(o.read_text()) for o in outs.values())

        _wait(all_sealed, "first update from every site", procs, timeout)
        got = {s: json.loads(o.read_text()) for s, o in outs.items()}
    finally:
        _stop(procs)
        broker.stop()
    return {
        "edges": {
            s: {k: round(g[k]["cpu_s"], 3) for k in ("start", "first_update")} | {"loaded": g["first_update"]["loaded"]}
            for s, g in got.items()
        },
        "wall_to_all_first_updates_s": round(max(g["first_update"]["at"] for g in got.values()) - t0, 3),
    }


def _mean_cpu(run: dict[str, Any], stage: str) -> float:
    return statistics.fmean(e[stage] for e in run["edges"].values())


def summarise(runs: list[dict[str, Any]], trees: list[str]) -> dict[str, Any]:
    """Medians per tree, and per-round ratios of each tree against the first (neighbours in time)."""
    out: dict[str, Any] = {}
    for t in trees:
        rs = [r for r in runs if r["tree"] == t and not r["warmup"]]
        if not rs:
            continue
        per: dict[str, Any] = {
            "runs": len(rs),
            "median_start_cpu_s": statistics.median(_mean_cpu(r, "start") for r in rs),
            "median_first_update_cpu_s": statistics.median(_mean_cpu(r, "first_update") for r in rs),
            "median_wall_to_all_first_updates_s": statistics.median(r["wall_to_all_first_updates_s"] for r in rs),
            "loaded_at_first_update": sorted({m for r in rs for e in r["edges"].values() for m in e["loaded"]}),
        }
        if t != trees[0]:
            pairs = [(r, b) for r in rs for b in runs if b["tree"] == trees[0] and b["round"] == r["round"]]
            for key, fn in (
                ("first_update_cpu", lambda r: _mean_cpu(r, "first_update")),
                ("start_cpu", lambda r: _mean_cpu(r, "start")),
                ("wall_to_all_first_updates", lambda r: r["wall_to_all_first_updates_s"]),
            ):
                ratios = [fn(r) / fn(b) for r, b in pairs]
                per[f"{key}_ratio_vs_first_tree"] = [round(x, 3) for x in ratios]
                per[f"median_{key}_ratio"] = statistics.median(ratios) if ratios else None
        out[t] = per
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", help="a checkout of the repository to run (repeatable; default: this)")
    ap.add_argument("--repeats", type=int, default=3, help="counted rounds per tree (after one warm-up round)")
    ap.add_argument("--timeout", type=float, default=180.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    trees = [Path(t).resolve() for t in (args.tree or [str(ROOT)])]
    labels = [f"{i}:{tree_label(t)}" for i, t in enumerate(trees)]
    e2e = _e2e()
    from fedline.demo.data import load_demo_data

    data = load_demo_data(derived=False)
    load_before = os.getloadavg()[0]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedline-edge-start-") as tmp:
        for rnd in range(args.repeats + 1):
            order = list(range(len(trees)))
            if rnd % 2:
                order.reverse()  # A B, B A, ...: neither tree always runs first
            for i in order:
                got = one_round(e2e, data, trees[i], Path(tmp) / f"r{rnd}-{i}", args.timeout)
                runs.append({"tree": labels[i], "round": rnd, "warmup": rnd == 0, **got})
                if not args.json:
                    edges = ", ".join(
                        f"{s} {e['start']:.2f}/{e['first_update']:.2f}" for s, e in sorted(got["edges"].items())
                    )
                    print(
                        f"round {rnd}{' (warm-up)' if rnd == 0 else ''} {labels[i]:>12}: CPU start/first update "
                        f"{edges} s; all three first updates after {got['wall_to_all_first_updates_s']:.2f} s",
                        flush=True,
                    )
    doc = {
        "benchmark": "edge_start",
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
