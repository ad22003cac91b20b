"""Run every fuzz harness for a budget and print what each did (the long run behind ``make fuzz``).

Each harness runs in its own process (``python fuzz/fuzz_<x>.py``) with a kept
corpus folder, so successive runs build on each other, and libFuzzer's limits
for a hang (``-timeout``) and for memory (``-rss_limit_mb``). A crash input is
saved under ``--artifacts`` and the harness is reported as failed; the exit
code is non-zero if any harness failed.

    .venv/bin/python fuzz/run.py                       # 200,000 executions per harness
    .venv/bin/python fuzz/run.py --seconds 300         # or a time budget per harness
    .venv/bin/python fuzz/run.py --only chunks --json  # one harness, one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESSES = sorted(p.stem.removeprefix("fuzz_") for p in HERE.glob("fuzz_*.py"))


def run_one(
    name: str, runs: int | None, seconds: int | None, corpus: Path, artifacts: Path, seed: int, rss_mb: int
) -> dict:
    folder = corpus / name
    folder.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    budget = [f"-max_total_time={seconds}"] if seconds else [f"-runs={runs}"]
    cmd = [
        sys.executable,
        str(HERE / f"fuzz_{name}.py"),
        *budget,
        f"-seed={seed}",
        f"-rss_limit_mb={rss_mb}",
        "-timeout=10",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/{name}-",
        str(folder),
    ]
    started = time.monotonic()
    # files written on every input (key files, site.toml) go to RAM when there is a /dev/shm
    scratch = tempfile.mkdtemp(prefix="fedline-fuzz-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, FUZZ_SCRATCH=scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out = proc.stdout + proc.stderr

    def stat(key: str) -> int | None:
        m = re.search(rf"stat::{key}:\s+(\d+)", out)
        return int(m.group(1)) if m else None

    cov = re.findall(r"cov: (\d+) ft: (\d+)", out)
    crash = re.search(r"Test unit written to (\S+)", out)
    error = re.search(r"=== Uncaught Python exception: ===\n(.+)", out)
    return {
        "harness": name,
        "ok": proc.returncode == 0,
        "executions": stat("number_of_executed_units"),
        "coverage": int(cov[-1][0]) if cov else None,
        "features": int(cov[-1][1]) if cov else None,
        "corpus_files": sum(1 for _ in folder.iterdir()),
        "peak_rss_mb": stat("peak_rss_mb"),
        "seconds": round(time.monotonic() - started, 1),
        "crash_input": crash.group(1) if crash else None,
        "error": error.group(1).strip() if error else (None if proc.returncode == 0 else out[-300:]),
        "command": " ".join(cmd[1:]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=200_000, help="executions per harness")
    ap.add_argument("--seconds", type=int, help="time budget per harness instead of --runs")
    ap.add_argument("--only", action="append", choices=HARNESSES, help="run only these harnesses")
    ap.add_argument("--corpus", type=Path, default=HERE / "corpus", help="kept corpus folders (one per harness)")
    ap.add_argument("--artifacts", type=Path, default=HERE / "crashes", help="where crash inputs are written")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rss-mb", type=int, default=1024, help="memory limit: more is a crash")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    results = [
        run_one(n, args.runs, args.seconds, args.corpus, args.artifacts, args.seed, args.rss_mb)
        for n in (args.only or HARNESSES)
    ]
    if args.json:
        print(json.dumps({"benchmark": "fuzz", "results": results}))
    else:
        print(
            f"{'harness':<16} {'result':<7} {'executions':>10} {'cov':>5} {'ft':>6} {'corpus':>6} "
            f"{'rss MB':>6} {'s':>7}  error"
        )
        for r in results:
            print(
                f"{r['harness']:<16} {'ok' if r['ok'] else 'CRASH':<7} {r['executions'] or 0:>10} "
                f"{r['coverage'] or 0:>5} {r['features'] or 0:>6} {r['corpus_files']:>6} "
                f"{r['peak_rss_mb'] or 0:>6} {r['seconds']:>7}  {r['error'] or ''}"
            )
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
