"""Benchmark of the line inference: scoring latency, swap time, resident memory.

    .venv/bin/python bench/infer.py            # readable table
    .venv/bin/python bench/infer.py --json     # one JSON object
    .venv/bin/python bench/infer.py --manifest # also time swaps from a signed manifest over Mosquitto

What is measured, and how:

- **model latency**: ``LoadedModel.score`` (onnxruntime, 1 thread) on one row
  and on a batch of ``--batch`` rows, p50 / p99 over many calls;
- **service latency per sample**: rows fed at ``--rate`` rows/s into a running
  ``InferenceService``; from a row entering the queue until its prediction is
  written (JSON lines) — p50 / p99; per-batch scoring time p50 / p99;
- **swap time**: ``--swaps`` new versions written to the model directory (and
  with ``--manifest`` published as signed manifests over a private Mosquitto)
  while rows flow; from the service first seeing the new version until it
  serves (build session + probe + canary + swap);
- **peak RSS** of the service process (``ru_maxrss``) and whether torch got
  imported, next to a bare ``import torch`` for comparison.

The service runs in a child process that imports only what ``fedline infer``
imports, so its RSS is the service's. The model is an MLP like the default
``ModelSpec`` (5 features, hidden 32 and 16), built with ``onnx.helper``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# bench/ itself must not be on the path: bench/edge.py and bench/aggregator.py would shadow the packages
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

N_FEATURES = 5
HIDDEN = (32, 16)


def make_models(out: Path, count: int) -> list[Path]:
    """``count`` versions of the MLP with different weights, written as .onnx files."""
    import numpy as np

    from tests.inference.onnx_models import mlp_onnx

    paths = []
    sizes = (N_FEATURES, *HIDDEN, 1)
    for v in range(count):
        rng = np.random.default_rng(v)
        ws = [rng.normal(0, 1 / np.sqrt(a), (a, b)) for a, b in itertools.pairwise(sizes)]
        bs = [rng.normal(0, 0.1, b) for b in sizes[1:]]
        p = out / f"model-{v}.onnx"
        p.write_bytes(mlp_onnx(ws, bs))
        paths.append(p)
    return paths


def pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# --------------------------------------------------------------------------- child: the service
def child(args: argparse.Namespace) -> dict:
    import asyncio
    import resource

    import numpy as np

    from edge.inference.config import parse_infer_config
    from edge.inference.model_dir import publish_model
    from edge.inference.service import InferenceService
    from edge.inference.session import ModelInfo, build_model
    from firmware_adapters.rows import Row

    work = Path(args.workdir)
    blobs = [p.read_bytes() for p in sorted(work.glob("model-*.onnx"), key=lambda p: int(p.stem.split("-")[1]))]
    rss_start_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    # model latency
    model = build_model(blobs[0], ModelInfo(0, "", "bench"), (N_FEATURES,))
    rng = np.random.default_rng(0)
    one = rng.uniform(size=(1, N_FEATURES)).astype(np.float32)
    many = rng.uniform(size=(args.batch, N_FEATURES)).astype(np.float32)
    single, batched = [], []
    for _ in range(200):
        model.score(one)
        model.score(many)
    for _ in range(args.iterations):
        t0 = time.perf_counter()
        model.score(one)
        t1 = time.perf_counter()
        model.score(many)
        t2 = time.perf_counter()
        single.append(t1 - t0)
        batched.append(t2 - t1)

    # the service under a paced stream, with swaps
    feats = [{"tag": f"t{i}", "range": [0.0, 1.0]} for i in range(N_FEATURES)]
    doc = {
        "line": {
            "site": "bench",
            "federation": "bench",
            "state_dir": "state",
            "model_source": "model_dir",
            "model_dir": "models",
            "poll_s": 0.05,
            "batch_max": args.batch,
            "canary": {"min_rows": 32, "margin": 10.0},
        },
        "rows": {"features": feats, "label": "y"},
        "output": {"file": "predictions.jsonl", "threshold": 0.9},
    }
    cfg = parse_infer_config(doc, work / "line.toml")
    publish_model(work / "models", blobs[0], 1)
    stop = asyncio.Event()

    async def rows():
        tick = 0.01
        per_tick = max(1, int(args.rate * tick))
        nxt = time.perf_counter()
        while not stop.is_set():
            for _ in range(per_tick):
                x = rng.uniform(size=N_FEATURES).astype(np.float32)
                yield Row(x=x, y=float(x.sum() > 2.5), ts=time.time())
            nxt += tick
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))

    async def drive() -> InferenceService:
        service = InferenceService(cfg, rows=rows())
        task = asyncio.create_task(service.run())
        while service.current_version() != 1:
            await asyncio.sleep(0.01)
        await asyncio.sleep(args.seconds / (args.swaps + 1))
        for v in range(2, args.swaps + 2):
            publish_model(work / "models", blobs[(v - 1) % len(blobs)], v)
            while service.current_version() != v:
                await asyncio.sleep(0.005)
            await asyncio.sleep(args.seconds / (args.swaps + 1))
        stop.set()
        await task
        return service

    service = asyncio.run(drive())
    swaps = [s.seconds for s in service.stats.swaps if s.kind == "reload"][1:]  # the first loads at start
    batch_t = [t for _, t in service.stats.batch_latency]
    batch_n = [n for n, _ in service.stats.batch_latency]
    return {
        "model": {"features": N_FEATURES, "hidden": list(HIDDEN), "onnx_bytes": len(blobs[0])},
        "model_latency_us": {
            "row_p50": pct(single, 50) * 1e6,
            "row_p99": pct(single, 99) * 1e6,
            "batch": args.batch,
            "batch_p50": pct(batched, 50) * 1e6,
            "batch_p99": pct(batched, 99) * 1e6,
            "batch_per_row_p50": pct(batched, 50) / args.batch * 1e6,
        },
        "service": {
            "rate_rows_s": args.rate,
            "rows": service.stats.predictions,
            "sample_latency_us_p50": pct(list(service.stats.row_latency), 50) * 1e6,
            "sample_latency_us_p99": pct(list(service.stats.row_latency), 99) * 1e6,
            "batch_us_p50": pct(batch_t, 50) * 1e6,
            "batch_us_p99": pct(batch_t, 99) * 1e6,
            "mean_batch_rows": float(np.mean(batch_n)) if batch_n else 0.0,
            "refused": dict(service.stats.refused),
        },
        "swap_model_dir_ms": {
            "count": len(swaps),
            "p50": pct(swaps, 50) * 1e3,
            "max": max(swaps) * 1e3 if swaps else None,
        },
        "rss": {"start_kb": rss_start_kb, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss},
        "torch_imported": "torch" in sys.modules,
    }


# --------------------------------------------------------------------------- manifest swaps over Mosquitto
def manifest_swaps(blobs: list[bytes], count: int, workdir: Path) -> dict:
    """Swap time from a signed manifest's arrival to serving, over a private Mosquitto."""
    import asyncio
    import secrets

    import numpy as np

    from broker_bridge.chunking import split
    from broker_bridge.client import BrokerSettings, MqttClient
    from broker_bridge.envelope import content_hash, seal_for_federation, sign_manifest
    from broker_bridge.federation_key import new_content_key, seal_grant, seal_manifest
    from broker_bridge.keys import KeyPair
    from broker_bridge.mosquitto import MosquittoProcess
    from broker_bridge.topics import Topics
    from edge.inference.config import parse_infer_config
    from edge.inference.service import InferenceService
    from firmware_adapters.rows import Row

    broker = MosquittoProcess(workdir / "broker", federation="bench", sites=["line"]).start()
    try:
        keys = KeyPair.generate("aggregator", "aggregator")
        keys.public().save(workdir / "aggregator.pub")
        line_keys = KeyPair.generate("site", "line")  # the line opens the content key granted to its site
        line_keys.save(workdir / "line.key")
        content_key = new_content_key()

        def settings(user: str) -> BrokerSettings:
            return BrokerSettings(
                url=broker.url,
                username=user,
                password=broker.password(user),
                client_id=f"{user}-bench",
                backoff_min_s=0.05,
                backoff_max_s=0.5,
            )

        feats = [{"tag": f"t{i}", "range": [0.0, 1.0]} for i in range(N_FEATURES)]
        doc = {
            "line": {
                "site": "line",
                "federation": "bench",
                "state_dir": "state-m",
                "model_source": "manifest",
                "aggregator_key": "aggregator.pub",
                "site_key": "line.key",
                "canary": {"enabled": False},
            },
            "rows": {"features": feats},
            "broker": {k: v for k, v in settings("line").__dict__.items() if v is not None},
        }
        cfg = parse_infer_config(doc, workdir / "line-m.toml")
        topics = Topics("bench")
        rng = np.random.default_rng(1)
        stop = asyncio.Event()

        async def rows():
            while not stop.is_set():
                yield Row(x=rng.uniform(size=N_FEATURES).astype(np.float32), y=None, ts=time.time())
                await asyncio.sleep(0.001)

        async def run() -> list[float]:
            service = InferenceService(cfg, rows=rows())
            task = asyncio.create_task(service.run())
            async with MqttClient(settings("aggregator")) as agg:
                await agg.publish(
                    topics.fedkey("line"), seal_grant("bench", line_keys.public(), 1, content_key, keys), retain=True
                )
                for v in range(1, count + 2):
                    blob = blobs[(v - 1) % len(blobs)]
                    msg_id = f"onnx-{v}-{secrets.token_hex(3)}"
                    chunks = split(seal_for_federation(blob, content_key), msg_id, 100 * 1024)
                    await agg.publish_many([(topics.onnx_chunk(v, i), c) for i, c in enumerate(chunks)], retain=True)
                    manifest = {
                        "federation": "bench",
                        "version": v,
                        "epoch": 1,
                        "created_at": time.time(),
                        "spec": {},
                        "weights": {"hash": "", "size": 0, "chunks": 0},
                        "onnx": {
                            "hash": content_hash(blob),
                            "size": len(blob),
                            "chunks": len(chunks),
                            "msg_id": msg_id,
                        },
                    }
                    await agg.publish(
                        topics.manifest(), seal_manifest(sign_manifest(manifest, keys), v, 1, content_key), retain=True
                    )
                    while service.current_version() != v:
                        await asyncio.sleep(0.005)
                    await asyncio.sleep(0.1)
            stop.set()
            await task
            return [s.seconds for s in service.stats.swaps if s.kind == "reload"][1:]

        swaps = asyncio.run(run())
    finally:
        broker.stop()
    return {"count": len(swaps), "p50": pct(swaps, 50) * 1e3, "max": max(swaps) * 1e3 if swaps else None}


def torch_rss_kb() -> int | None:
    code = "import resource, torch; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        return int(out.stdout.strip())
    except (ValueError, subprocess.TimeoutExpired):
        return None


def table(r: dict) -> str:
    m, s, sw, rss = r["model_latency_us"], r["service"], r["swap_model_dir_ms"], r["rss"]
    lines = [
        f"line inference benchmark — MLP {r['model']['features']}->{'->'.join(map(str, r['model']['hidden']))}->1, "
        f"{r['model']['onnx_bytes']} B ONNX, onnxruntime 1 thread",
        "",
        f"{'measure':<46}{'p50':>12}{'p99':>12}",
        f"{'model latency, 1 row, hot loop (us)':<46}{m['row_p50']:>12.1f}{m['row_p99']:>12.1f}",
        f"{'model latency, batch of ' + str(m['batch']) + ', hot loop (us)':<46}{m['batch_p50']:>12.1f}{m['batch_p99']:>12.1f}",
        f"{'  per row in that batch (us)':<46}{m['batch_per_row_p50']:>12.2f}",
        f"{'service, per sample queued->written (us)':<46}{s['sample_latency_us_p50']:>12.1f}"
        f"{s['sample_latency_us_p99']:>12.1f}",
        f"{'service, per batch: stack rows + score (us)':<46}{s['batch_us_p50']:>12.1f}{s['batch_us_p99']:>12.1f}",
        f"{'  at ' + str(s['rate_rows_s']) + ' rows/s, mean batch':<46}{s['mean_batch_rows']:>12.1f}{'rows':>12}",
        "",
        f"{'swap: new version seen -> serving':<46}{'p50 (ms)':>12}{'max (ms)':>12}",
        f"{'  model directory, ' + str(sw['count']) + ' swaps':<46}{sw['p50']:>12.1f}{sw['max']:>12.1f}",
    ]
    if "swap_manifest_ms" in r:
        mm = r["swap_manifest_ms"]
        lines.append(
            f"{'  signed manifest over Mosquitto, ' + str(mm['count']) + ' swaps':<46}"
            f"{mm['p50']:>12.1f}{mm['max']:>12.1f}"
        )
    lines += [
        "",
        f"{'service peak RSS (MiB)':<46}{rss['peak_kb'] / 1024:>12.1f}",
        f"{'  of which at start, after imports (MiB)':<46}{rss['start_kb'] / 1024:>12.1f}",
        f"{'torch imported by the service':<46}{r['torch_imported']!s:>12}",
    ]
    if r.get("torch_import_rss_kb"):
        lines.append(f"{'for comparison: python + import torch (MiB)':<46}{r['torch_import_rss_kb'] / 1024:>12.1f}")
    lines.append(f"{'rows scored in the service run':<46}{s['rows']:>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--rate", type=int, default=2000, help="rows per second fed to the service")
    ap.add_argument("--seconds", type=float, default=4.0, help="length of the service run")
    ap.add_argument("--swaps", type=int, default=10, help="model swaps during the run")
    ap.add_argument("--batch", type=int, default=64, help="batch size (and the service's batch_max)")
    ap.add_argument("--iterations", type=int, default=3000, help="calls for the model latency")
    ap.add_argument("--manifest", action="store_true", help="also time swaps from manifests over Mosquitto")
    ap.add_argument("--no-torch-baseline", action="store_true", help="skip the 'import torch' RSS comparison")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="fedline-bench-infer-") as tmp:
        work = Path(tmp)
        paths = make_models(work, 4)
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            "--workdir",
            tmp,
            "--rate",
            str(args.rate),
            "--seconds",
            str(args.seconds),
            "--swaps",
            str(args.swaps),
            "--batch",
            str(args.batch),
            "--iterations",
            str(args.iterations),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return 1
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if args.manifest:
            result["swap_manifest_ms"] = manifest_swaps([p.read_bytes() for p in paths], args.swaps, work)
    if not args.no_torch_baseline:
        result["torch_import_rss_kb"] = torch_rss_kb()
    print(json.dumps(result) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
