"""Ingest benchmark: samples per second through the adapter pipeline, and its CPU cost.

Pipelines measured (each: source -> RowBuilder -> float32 rows, as the edge agent runs it):

- ``csv``: CSV replay of data/ai4i2020.csv at full speed;
- ``modbus_tcp``: polling a local simulated PLC (``fedline plc-sim`` in a separate
  process, so its CPU is not counted) back to back, one request per table;
- ``sparkplug_decode``: decoding Sparkplug B NDATA payloads by alias (no broker:
  the cost of the reader itself).

CPU is this process's user+system time (``time.process_time``) per 1,000 samples.
Prints a table; ``--json`` prints one JSON object instead.

    .venv/bin/python bench/ingest.py [--json] [--modbus-samples 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from firmware_adapters import build_source  # noqa: E402
from firmware_adapters.registers import load_register_map  # noqa: E402
from firmware_adapters.rows import RowBuilder, parse_row_mapping  # noqa: E402

AI4I = REPO / "data" / "ai4i2020.csv"
AI4I_MAP = REPO / "firmware_adapters" / "maps" / "ai4i2020.toml"
FEATURES = [
    "Air temperature [K]",
    "Process temperature [K]",
    "Rotational speed [rpm]",
    "Torque [Nm]",
    "Tool wear [min]",
]


def builder() -> RowBuilder:
    mapping = parse_row_mapping({"features": [{"tag": t} for t in FEATURES], "label": "Machine failure"})
    return RowBuilder(mapping, ranges=load_register_map(AI4I_MAP).ranges())


async def _drain(source: Any, n: int | None) -> tuple[int, int]:
    rows = builder()
    count = made = 0
    agen = source.__aiter__()
    try:
        async for sample in agen:
            if not sample.good:
                continue
            count += 1
            if rows.push(sample) is not None:
                made += 1
            if n is not None and count >= n:
                break
    finally:
        await agen.aclose()
    return count, made


def measure(name: str, fn) -> dict[str, Any]:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    samples, rows = fn()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "pipeline": name,
        "samples": samples,
        "rows": rows,
        "wall_s": round(wall, 3),
        "samples_per_s": round(samples / wall, 1),
        "cpu_ms_per_1000": round(1000 * cpu / samples * 1000, 2),
    }


def bench_csv() -> tuple[int, int]:
    return asyncio.run(_drain(build_source({"kind": "csv", "path": str(AI4I)}), None))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_modbus(n: int) -> tuple[int, int]:
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        # the poller's map has no row counter, so every poll is a sample: this measures polling,
        # not the simulated PLC's row rate
        text = AI4I_MAP.read_text().replace('row_counter = "row"', "")
        map_file = Path(tmp) / "map.toml"
        map_file.write_text(text)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        sim = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedline.cli",
                "--log-level",
                "WARNING",
                "plc-sim",
                "--csv",
                str(AI4I),
                "--map",
                str(AI4I_MAP),
                "--port",
                str(port),
                "--rate",
                "10",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        try:
            source = build_source(
                {
                    "kind": "modbus_tcp",
                    "host": "127.0.0.1",
                    "port": port,
                    "map": str(map_file),
                    "poll_interval_s": 1e-6,
                    "reconnect_initial_s": 0.05,
                    "reconnect_max_s": 0.2,
                }
            )
            # wait for the simulator to listen (its start-up is not part of the measurement)
            asyncio.run(_drain(source, 1))
            return asyncio.run(_drain(source, n))
        finally:
            sim.terminate()
            sim.wait(10)


def bench_sparkplug(n: int) -> tuple[int, int]:
    from firmware_adapters.sparkplug import sparkplug_b_pb2 as pb
    from firmware_adapters.sparkplug.codec import build_payload

    source = build_source({"kind": "sparkplug", "url": "mqtt://127.0.0.1:1"})
    birth = build_payload(
        [(t, i, pb.Double, 1.0) for i, t in enumerate(FEATURES)] + [("Machine failure", 9, pb.Boolean, False)], seq=0
    )
    payloads = [
        build_payload(
            [(None, i, pb.Double, 300.0 + k % 7) for i in range(len(FEATURES))] + [(None, 9, pb.Boolean, False)],
            seq=(k + 1) % 256,
        )
        for k in range(n)
    ]

    async def run() -> tuple[int, int]:
        rows = builder()
        await source.handle("spBv1.0/g/NBIRTH/n", birth)
        count = made = 0
        for p in payloads:
            for sample in await source.handle("spBv1.0/g/NDATA/n", p):
                count += 1
                made += rows.push(sample) is not None
        return count, made

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--modbus-samples", type=int, default=2000)
    ap.add_argument("--sparkplug-samples", type=int, default=20000)
    args = ap.parse_args(argv)
    import logging

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    results = [
        measure("csv", bench_csv),
        measure("modbus_tcp", lambda: bench_modbus(args.modbus_samples)),
        measure("sparkplug_decode", lambda: bench_sparkplug(args.sparkplug_samples)),
    ]
    if args.json:
        print(json.dumps({"benchmark": "ingest", "cpu_count": os.cpu_count(), "results": results}))
        return 0
    cols = ["pipeline", "samples", "rows", "wall_s", "samples_per_s", "cpu_ms_per_1000"]
    widths = [max(len(c), *(len(str(r[c])) for r in results)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for r in results:
        print("  ".join(str(r[c]).rjust(w) if i else str(r[c]).ljust(w) for i, (c, w) in enumerate(zip(cols, widths))))
    print("\nsamples/s: source -> RowBuilder; cpu: this process's CPU ms per 1,000 samples (plc-sim runs apart).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
