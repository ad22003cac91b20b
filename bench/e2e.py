"""End-to-end benchmark: the whole chain against the plain single-process loop.

Task (issue 7): three sites (AI4I 2020 product types L/M/H, 80/20 split), MLP 5→32→32→1,
2 local epochs per update, 10 global versions, sealing and DP-SGD on.

- **chain**: every site is a separate ``fedline edge`` process, the aggregator a
  ``fedline aggregator`` process with the demo's strategy (FedBuff, K = 3, its buffer
  timeout and staleness weighting; without the demo's secure aggregation, whose cost
  bench/secagg.py measures) and ONNX publishing on, all talking to a real
  private Mosquitto through counting TCP proxies. Each edge gets its training rows from
  a CSV replay of its training rows at full speed; like the demo's sites, each trains as soon
  as a new global version arrives (``training.on_new_model``), on the same rows as the plain loop.
- **plain loop** (the floor): the same training code (``edge.trainer.train_round``, Opacus
  DP-SGD, same batch sizes) and the same sample-weighted averaging in one process, no
  network, no sealing; measured with and without DP.

Models are for members only (issue 13): the aggregator encrypts weights, ONNX and manifest
under the federation content key and every site decrypts them. **model crypto** is what that
costs the chain: the operations it adds per version (the aggregator seals the weights, the
ONNX and the signed manifest; each site opens the manifest and the weights), timed in-process
on this run's blob sizes (median of 50) and summed over the versions, against the chain's wall
time. They run one after another on the chain's critical path, so this bounds what encryption adds.

Reported: wall time (chain: from the first process start to the 10th version's manifest,
and the same after start-up, i.e. from version 0 on the wire), peak RSS of every process,
bytes on the wire (TCP to and from the broker, MQTT framing included) against the logical
payload (parameters × 4 bytes × transfers: one update up per update, one model down per
site per version), both counted up to the moment the 10th version's manifest arrives (the
sites go on training while the bench stops them: a version 11 is in no logical count), and
the final ROC AUC per site on its held-out rows.

CPU beside the wall times (not a target; it moves less than wall time when other work loads the machine): each
chain process's CPU seconds (user + system, every thread) from its start to the 10th version's manifest, each
edge's CPU at the end of its start (its ``edge.start_cost`` event: imports and construction), the plain DP
loop's CPU in this process and started as a process (``ratio_cpu_vs_plain_dp_cold``).

With ``--quantise int8`` every site sends int8 updates (``[update] quantise = "int8"``,
``broker_bridge.quantised``) and the aggregator publishes each version as its int8 step too
(``[publish] quantise = "int8"``: the sites follow the model by those steps, ``edge.follow_steps``);
the logical payload stays float32 (parameters × 4 bytes), so the wire ratio shows what quantisation
saves, ``wire_updates_vs_logical_updates`` isolates the updates and ``site_downlink_vs_logical_models``
what reaches the sites against their float32 models. ``--hidden 256,256`` runs a larger model
(about 68k parameters) where fixed framing (headers, signatures, statuses, receipts) weighs less.

Usage: ``python bench/e2e.py`` (table) or ``python bench/e2e.py --json`` (one JSON object).
The machine's other load counts: run it on a quiet machine for figures to quote.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedline.demo.data import DemoData, load_demo_data  # noqa: E402
from fedline.testing.bench_trees import compile_tree  # noqa: E402

HIDDEN = [32, 32]
EPOCHS = 2
VERSIONS = 10
BATCH_FRACTION = 0.03  # the demo's tuned defaults (fedline/demo/workspace.py, runner.py)
NOISE = 1.0
CLIP = 3.0
LR = 0.033
MOMENTUM = 0.9


def training_configs(data: DemoData) -> dict[str, Any]:
    from edge.config import TrainingConfig
    from fedline.demo.workspace import dp_batch_size

    return {
        s.site: TrainingConfig(
            epochs=EPOCHS,
            batch_size=dp_batch_size(len(s.train_rows), BATCH_FRACTION),
            lr=LR,
            momentum=MOMENTUM,
            threads=1,
        )
        for s in data.sites
    }


def privacy_config():
    from edge.config import PrivacyConfig

    return PrivacyConfig(epsilon=50.0, delta=1e-5, noise_multiplier=NOISE, max_grad_norm=CLIP)


def demo_strategy() -> dict[str, Any]:
    """The demo's aggregator strategy (FedBuff, its K, staleness weighting and buffer timeout), from its tuning."""
    from fedline.demo.workspace import Tuning

    t = Tuning()
    return {
        "kind": "fedbuff",
        "buffer_size": t.buffer_size,
        "staleness": t.staleness,
        "a": t.staleness_a,
        "max_staleness": t.max_staleness,
        "server_lr": t.server_lr,
        "buffer_timeout_s": t.buffer_timeout_s,
    }


def model_doc(data: DemoData) -> dict[str, Any]:
    mean, scale = data.input_standardisation()  # the demo's nominal operating point (fixed, public)
    return {
        "kind": "mlp",
        "n_features": 5,
        "hidden": HIDDEN,
        "task": "classification",
        "input_mean": mean,
        "input_scale": scale,
    }


def spec(data: DemoData):
    from models.spec import ModelSpec

    return ModelSpec.from_dict(model_doc(data))


# --------------------------------------------------------------------------- plain loop
def plain_loop(data: DemoData, dp: bool) -> dict[str, Any]:
    import psutil
    import torch

    from fedline.demo.baselines import evaluate, predict
    from fedline.demo.plainloop import fedavg

    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    r = fedavg(
        data, spec(data), VERSIONS, training_configs(data), privacy_config() if dp else None, evaluate_each_round=False
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    auc = {s.site: evaluate(data, lambda x: predict(spec(data), r.params, x), i) for i, s in enumerate(data.sites)}
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "auc": auc,
        "epsilon": r.epsilon,
        "n_params": r.n_params,
        "transfers": r.transfers,
        "peak_rss_mb": psutil.Process().memory_info().rss / 2**20,
    }


# --------------------------------------------------------------------------- the chain
def write_configs(data: DemoData, root: Path, broker_urls: dict[str, str], quantise: str = "off") -> dict[str, Path]:
    from aggregator.normbound import dp_table
    from fedline.demo.data import write_csv
    from fedline.demo.workspace import Workspace, make_keys, rows_table, write_toml

    ws = Workspace(root, federation="bench")
    make_keys(ws, [s.site for s in data.sites])
    tcfg = training_configs(data)
    paths: dict[str, Path] = {}
    model = model_doc(data)
    for s in data.sites:
        d = root / "sites" / s.site
        write_csv(d / "history.csv", data.columns, s.train_rows)
        t = tcfg[s.site]
        doc = {
            "site": s.site,
            "federation": "bench",
            "data_dir": "state",
            "model_dir": "models",
            "status_interval_s": 60.0,
            "keys": {"private": str(ws.keys / f"{s.site}.key"), "enrollment": str(ws.keys / "enrollment.json")},
            "broker": {
                "url": broker_urls[s.site],
                "username": s.site,
                "password_file": str(ws.credentials(s.site)),
                "client_id": f"edge-{s.site}",
                "backoff_min_s": 0.1,
                "backoff_max_s": 1.0,
            },
            "sources": [{"kind": "csv", "name": "history", "path": "history.csv"}],
            "rows": rows_table(data),
            "model": model,
            "dataset": {"holdout_fraction": 0.0},
            # as in the demo: a round as soon as a new global version arrives, a timer only as the fallback
            "training": {
                "every_rows": 1_000_000,
                "every_s": 5.0,
                "on_new_model": True,
                "min_rows": 20,
                "epochs": t.epochs,
                "batch_size": t.batch_size,
                "lr": t.lr,
                "momentum": t.momentum,
                "threads": 1,
            },
            "privacy": {"epsilon": 50.0, "delta": 1e-5, "noise_multiplier": NOISE, "max_grad_norm": CLIP},
            "update": {"quantise": quantise},
        }
        paths[s.site] = write_toml(d / "site.toml", doc)
    agg = {
        "aggregator": {
            "federation": "bench",
            "key_file": str(ws.keys / "aggregator.key"),
            "enrollment_file": str(ws.keys / "enrollment.json"),
            "state_dir": "state",
            "workers": 1,
        },
        "model": model,
        "broker": {
            "url": broker_urls["aggregator"],
            "username": "aggregator",
            "password_file": str(ws.credentials("aggregator")),
            "client_id": "aggregator",
            "backoff_min_s": 0.1,
            "backoff_max_s": 1.0,
        },
        "strategy": demo_strategy(),
        "dp": dp_table(
            [(len(s.train_rows), tcfg[s.site].batch_size) for s in data.sites],
            epochs=EPOCHS,
            lr=LR,
            momentum=MOMENTUM,
            clip_norm=CLIP,
            noise_multiplier=NOISE,
        ),
        # as in the demo: every version's ONNX is published; with int8, each version's int8 step as well
        "publish": {"retain_versions": 2, "onnx": True, "quantise": quantise},
    }
    paths["aggregator"] = write_toml(root / "aggregator" / "aggregator.toml", agg)
    return paths


async def chain(data: DemoData, timeout_s: float, quantise: str = "off") -> dict[str, Any]:
    import psutil

    from broker_bridge import layouts
    from broker_bridge.chunking import Reassembler
    from broker_bridge.client import BrokerSettings
    from broker_bridge.envelope import decode_tensors, open_for_federation
    from broker_bridge.federation_key import Keyring, open_manifest
    from broker_bridge.keys import Enrollment, KeyPair
    from broker_bridge.mosquitto import MosquittoProcess
    from broker_bridge.topics import Topics
    from fedline.demo.audit import TrafficRecorder
    from fedline.demo.baselines import evaluate, predict
    from fedline.netproxy import TcpProxy
    from models import build_model, shared_state

    sites = [s.site for s in data.sites]
    with tempfile.TemporaryDirectory(prefix="fedline-bench-") as tmp:
        root = Path(tmp)
        broker = MosquittoProcess(root / "broker", federation="bench", sites=sites).start()
        proxies = {n: await TcpProxy(broker.port, "127.0.0.1", n).start() for n in ["aggregator", *sites]}
        (root / "broker" / "credentials").mkdir(exist_ok=True)
        paths = write_configs(data, root, {n: p.url for n, p in proxies.items()}, quantise)
        # write_configs made the keys under root/keys; the broker's credentials are in root/broker
        enrollment = Enrollment.load(root / "keys" / "enrollment.json")
        topics = Topics("bench")
        manifests: dict[int, tuple[float, dict]] = {}
        weights: dict[str, bytes] = {}
        chunks = Reassembler(timeout_s=60)
        at_end: dict[str, tuple[int, int]] = {}  # per proxy (bytes up, bytes down) when version 10 came
        handles: dict[str, psutil.Process] = {}  # the chain's processes (Mosquitto's too), once started
        cpu_at_end: dict[str, float] = {}  # CPU seconds (user + system, every thread) of each when version 10 came
        end_count: list[int] = []  # how many messages the recorder held then
        member = KeyPair.load(root / "keys" / f"{sites[0]}.key")  # models are for members: read as the first site
        keyring = Keyring()

        def on_message(m) -> None:
            if not m.payload:
                return
            info = topics.parse(m.topic)
            if info.kind == "fedkey" and info.site == member.ident:
                keyring.add_grant(m.payload, member, enrollment.aggregator.sign_pub, "bench")
            elif info.kind == "manifest":  # the grant comes first: it is published before version 0
                doc, _ = open_manifest(m.payload, keyring, enrollment.aggregator.sign_pub)
                manifests.setdefault(int(doc["version"]), (time.perf_counter(), doc))
                if int(doc["version"]) == VERSIONS and not at_end:  # the run's end: what the wire carried so far
                    at_end.update({n: (p.stats.bytes_up, p.stats.bytes_down) for n, p in proxies.items()})
                    end_count.append(len(recorder.messages))
                    cpu_at_end.update({n: _cpu_s(h) for n, h in handles.items()})
            elif info.kind == "weights":
                done = chunks.add(m.payload)
                if done:
                    weights[done[0]] = done[1]

        obs = BrokerSettings(
            url=broker.url,
            username="observer",
            password=broker.password("observer"),
            client_id="bench-observer",
            backoff_min_s=0.1,
            backoff_max_s=1.0,
        )
        recorder = TrafficRecorder(obs, f"{topics.root}/#", on_message=on_message)
        await recorder.start()
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        logs = root / "logs"
        logs.mkdir()
        procs: dict[str, subprocess.Popen] = {}
        peak: dict[str, float] = {"mosquitto": 0.0}
        t0 = time.perf_counter()
        for name, args in [
            ("aggregator", ["aggregator", "--config", str(paths["aggregator"])]),
            *[(f"edge-{s}", ["edge", "--config", str(paths[s])]) for s in sites],
        ]:
            cwd = paths["aggregator" if name == "aggregator" else name[5:]].parent
            with (logs / f"{name}.log").open("wb") as fh:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "fedline.cli", *args],
                    cwd=cwd,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            peak[name] = 0.0
        handles.update({n: psutil.Process(p.pid) for n, p in procs.items()})
        handles["mosquitto"] = psutil.Process(broker.proc.pid)  # type: ignore[union-attr]
        try:
            while VERSIONS not in manifests:
                await asyncio.sleep(0.1)
                for n, h in handles.items():
                    try:
                        peak[n] = max(peak[n], h.memory_info().rss / 2**20)
                    except psutil.Error:
                        pass
                dead = [n for n, p in procs.items() if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"{dead[0]} exited: " + (logs / f"{dead[0]}.log").read_text()[-2000:])
                if time.perf_counter() - t0 > timeout_s:
                    raise RuntimeError(f"no version {VERSIONS} within {timeout_s} s (have {sorted(manifests)})")
            t_end = manifests[VERSIONS][0]
            await asyncio.sleep(0.3)  # the last weights chunks
        finally:
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
            await recorder.stop()
            for p in proxies.values():
                await p.stop()
            broker.stop()
        wall = t_end - t0
        after_start = t_end - manifests[0][0] if 0 in manifests else None
        final = manifests[VERSIONS][1]
        # the bench reads the models as a member: the layouts of its own spec, for weights sent as FLT2
        template = build_model(spec(data))
        layouts.register_model({k: v.shape for k, v in shared_state(template, spec(data)).items()})
        final_blob = open_for_federation(weights[final["weights"]["msg_id"]], keyring[final["epoch"]])
        shared = decode_tensors(final_blob)
        n_params = int(sum(a.size for a in shared.values()))
        auc = {s.site: evaluate(data, lambda x: predict(spec(data), shared, x), i) for i, s in enumerate(data.sites)}
        # Everything is counted up to the 10th version's manifest (``at_end``): the sites go on training while
        # the bench reads the last weights and stops the processes, and a version 11 published then (its
        # weights to every site) is not in the logical count's 10 versions
        counted = recorder.messages[: end_count[0]]
        updates = sum(1 for m in counted if topics.parse(m.topic).kind == "update")
        update_msgs = len({m.topic.rsplit("/", 1)[0] for m in counted if topics.parse(m.topic).kind == "update"})
        up = {n: at_end[n][0] for n in proxies}
        down = {n: at_end[n][1] for n in proxies}
        wire = sum(up.values()) + sum(down.values())
        by_kind: dict[str, int] = {}
        count_by_kind: dict[str, int] = {}
        for m in counted:
            k = topics.parse(m.topic).kind
            by_kind[k] = by_kind.get(k, 0) + len(m.payload) + len(m.topic)
            count_by_kind[k] = count_by_kind.get(k, 0) + 1
        # logical payload: each update up once, each version's model down to each site once
        transfers = update_msgs + VERSIONS * len(sites)
        logical = n_params * 4 * transfers
        per_site, start_cpu = {}, {}
        for log in logs.glob("edge-*.log"):
            text = log.read_text()
            per_site[log.stem[5:]] = text.count("update.sealed")
            # each edge logs the CPU its start took (imports, construction), as it ends (edge/cli.py)
            found = re.search(r"edge\.start_cost .*?cpu_s=([0-9.]+)", text)
            start_cpu[log.stem[5:]] = float(found.group(1)) if found else None
        return {
            "wall_s": wall,
            "after_startup_s": after_start,
            "auc": auc,
            "peak_rss_mb": peak,
            "bytes_on_wire": wire,
            "logical_bytes": logical,
            "transfers": transfers,
            "n_params": n_params,
            "update_chunks": updates,
            "updates": update_msgs,
            "updates_per_site": per_site,
            # CPU seconds of each process (user + system, all threads) from its start to the 10th version's
            # manifest; Mosquitto's counts from the broker's start, a few seconds before
            "cpu_s_by_process": cpu_at_end,
            "cpu_s": sum(cpu_at_end.values()),
            "edge_start_cpu_s": start_cpu,
            "wire_by_party": {n: up[n] + down[n] for n in proxies},
            "wire_up_by_party": up,
            "wire_down_by_party": down,
            # the same until the processes were stopped (the bench's count before 1 Dec 2026)
            "wire_down_by_party_until_stop": {n: p.stats.bytes_down for n, p in proxies.items()},
            "updates_until_stop": len(
                {m.topic.rsplit("/", 1)[0] for m in recorder.messages if topics.parse(m.topic).kind == "update"}
            ),
            "published_bytes_by_kind": by_kind,
            "published_messages_by_kind": count_by_kind,
            "quantise": quantise,
            # the tensor format of the last version's weights: FLT2 (the table by reference) once every site's
            # status said it reads it (broker_bridge.layouts)
            "final_weights_format": bytes(final_blob[:4]).decode("ascii", "replace"),
            # the updates alone: bytes published on update topics against their float32 logical size
            "wire_updates_vs_logical_updates": by_kind.get("update", 0) / (n_params * 4 * update_msgs),
            # what reaches the sites (manifests, weights or int8 steps, receipts, grants) against their models
            "site_downlink_vs_logical_models": sum(down[s] for s in sites) / (n_params * 4 * VERSIONS * len(sites)),
            "model_crypto": model_crypto_cost(final["weights"]["size"], final["onnx"]["size"], len(sites), wall),
        }


def model_crypto_cost(weights_size: int, onnx_size: int, n_sites: int, wall_s: float) -> dict[str, Any]:
    """What encrypting the models adds to the chain: per version, the aggregator's seals and each site's opens."""
    import statistics

    from broker_bridge import envelope
    from broker_bridge.federation_key import Keyring, new_content_key, open_manifest, seal_manifest
    from broker_bridge.keys import KeyPair

    agg, key = KeyPair.generate("aggregator", "aggregator"), new_content_key()
    w, o = os.urandom(weights_size), os.urandom(onnx_size)
    doc = {
        "federation": "bench",
        "version": 1,
        "epoch": 1,
        "created_at": 0.0,
        "spec": {},
        "weights": {"hash": "0" * 64, "size": weights_size, "chunks": 1},
        "onnx": {"hash": "0" * 64, "size": onnx_size, "chunks": 1},
    }
    signed = envelope.sign_manifest(doc, agg)
    keyring, pub = Keyring({1: key}), bytes(agg.signing_key.verify_key)

    def timed(fn, n: int = 50) -> float:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return statistics.median(out)

    sw, so = envelope.seal_for_federation(w, key), envelope.seal_for_federation(o, key)
    sm = seal_manifest(signed, 1, 1, key)
    seal_s = timed(
        lambda: (
            envelope.seal_for_federation(w, key),
            envelope.seal_for_federation(o, key),
            seal_manifest(signed, 1, 1, key),
        )
    )
    open_s = timed(lambda: (open_manifest(sm, keyring, pub), envelope.open_for_federation(sw, key)))
    open_onnx_s = timed(lambda: envelope.open_for_federation(so, key))  # each line in manifest mode
    per_version = seal_s + n_sites * (open_s + open_onnx_s)
    total = per_version * (VERSIONS + 1)
    return {
        "seal_per_version_s": seal_s,
        "open_per_site_per_version_s": open_s + open_onnx_s,
        "per_version_s": per_version,
        "total_s": total,
        "share_of_chain": total / wall_s,
        "weights_bytes": weights_size,
        "onnx_bytes": onnx_size,
    }


def _cpu_s(h: Any) -> float:
    """A process's CPU seconds so far (user + system, every thread); 0 once it is gone."""
    try:
        t = h.cpu_times()
    except Exception:  # psutil.Error: gone already
        return 0.0
    return float(t.user + t.system)


def plain_loop_cold(hidden: list[int]) -> dict[str, Any]:
    """The plain loop with DP in a fresh process, timed from its start to its exit like the chain's processes.

    Why: the chain's wall time includes its processes' start (Python, torch and Opacus imported in each, about
    2 s of CPU per process) while :func:`plain_loop` runs in this process, with all of it imported before its
    timer starts. This is the same loop, started the way the chain's processes are.
    """
    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [sys.executable, __file__, "--plain-dp-only", "--hidden", ",".join(map(str, hidden))],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
    )
    wall, c1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    inner = json.loads(out.stdout.strip().splitlines()[-1])
    cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)  # the child's, waited for: all of it
    return {"wall_s": wall, "loop_wall_s": inner["wall_s"], "start_s": wall - inner["wall_s"], "cpu_s": cpu}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--timeout", type=float, default=240.0)
    ap.add_argument(
        "--quantise", choices=["off", "int8"], default="off", help="the sites' [update] and the [publish] quantise"
    )
    ap.add_argument("--hidden", default=",".join(map(str, HIDDEN)), help="hidden widths of the MLP (default 32,32)")
    ap.add_argument("--plain-dp-only", action="store_true", help=argparse.SUPPRESS)  # plain_loop_cold's process
    ap.add_argument(
        "--no-compile",
        action="store_true",
        help="leave the checkout without bytecode (each process then compiles fedline again where "
        "PYTHONDONTWRITEBYTECODE is set; before 1 Dec 2026 22:00 every run did)",
    )
    args = ap.parse_args()
    compiled = False
    if not args.plain_dp_only and not args.no_compile:
        compiled = compile_tree(ROOT)  # both sides' processes then start as from an installed copy
    HIDDEN[:] = [int(h) for h in args.hidden.split(",")]
    data = load_demo_data(derived=False)  # the task: the five raw features
    if args.plain_dp_only:
        print(json.dumps({"wall_s": plain_loop(data, dp=True)["wall_s"]}))
        return 0
    plain_nodp = plain_loop(data, dp=False)
    plain_dp = plain_loop(data, dp=True)
    plain_cold = plain_loop_cold(HIDDEN)
    ch = asyncio.run(chain(data, args.timeout, args.quantise))
    result = {
        "task": f"AI4I 2020, sites L/M/H (80/20), MLP 5-{'-'.join(map(str, HIDDEN))}-1, 2 epochs/update, "
        "10 versions, DP-SGD + sealing",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "bytecode_compiled": compiled,
        "plain_loop_no_dp": plain_nodp,
        "plain_loop_dp": plain_dp,
        "plain_loop_dp_cold": plain_cold,
        "chain": ch,
        "ratio_wall_vs_plain_dp": ch["wall_s"] / plain_dp["wall_s"],
        "ratio_wall_after_startup_vs_plain_dp": (
            ch["after_startup_s"] / plain_dp["wall_s"] if ch["after_startup_s"] else None
        ),
        # both started as processes and timed from their start (see plain_loop_cold); the ratio above is the
        # issue's, against the loop timed inside this warm process
        "ratio_wall_vs_plain_dp_cold": ch["wall_s"] / plain_cold["wall_s"],
        # CPU, not wall: what the chain's processes spent (every one, Mosquitto too) against the plain DP loop
        # started as a process; on a loaded machine this moves less than the wall ratios (it is not the target)
        "ratio_cpu_vs_plain_dp_cold": ch["cpu_s"] / plain_cold["cpu_s"],
        "ratio_wire_vs_logical": ch["bytes_on_wire"] / ch["logical_bytes"],
        # every transfer counted once, at its receiver (what arrives at the aggregator and the sites)
        "ratio_delivered_vs_logical": sum(ch["wire_down_by_party"].values()) / ch["logical_bytes"],
        # counted as before 1 Dec 2026: bytes until the processes were stopped, every update sent until then
        "ratio_delivered_vs_logical_until_stop": sum(ch["wire_down_by_party_until_stop"].values())
        / (ch["n_params"] * 4 * (ch["updates_until_stop"] + VERSIONS * len(ch["updates_per_site"]))),
        "model_crypto_share_of_chain": ch["model_crypto"]["share_of_chain"],
        "targets": {
            "wall_vs_plain_dp": 1.5,  # issue 19 (3.0 before)
            "wire_vs_logical": 1.3 if args.quantise == "off" else 0.4,
            "model_crypto_share_of_chain": 0.05,
        },
        "notes": [
            "bytes_on_wire counts both links of every message (sender to broker, broker to receiver): a "
            "broker carries each update twice, so this is about 2x what a direct connection would carry; "
            "ratio_delivered_vs_logical counts each transfer once, at its receiver",
            "status messages (each agent's, on a change of what it says and on its heartbeat) and signed "
            "receipts and manifests are protocol overhead beyond the logical payload",
            "bytes and updates are counted up to the 10th version's manifest (*_until_stop: until the "
            "processes were stopped, as before 1 Dec 2026)",
        ],
    }
    if args.json:
        print(json.dumps(result, default=float))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="bench/e2e.py — " + result["task"])
    for c in ("run", "wall s", "peak RSS MB", "bytes on wire", "× logical", *[f"AUC {s.site}" for s in data.sites]):
        t.add_column(c, justify="right" if c != "run" else "left")
    for name, r in (("plain loop, no DP", plain_nodp), ("plain loop, DP", plain_dp)):
        t.add_row(
            name,
            f"{r['wall_s']:.1f}",
            f"{r['peak_rss_mb']:.0f} (1 process)",
            "0",
            "–",
            *[f"{r['auc'][s.site]:.3f}" for s in data.sites],
        )
    rss = ch["peak_rss_mb"]
    t.add_row(
        "chain (processes + Mosquitto)",
        f"{ch['wall_s']:.1f} ({ch['after_startup_s']:.1f} after start-up)",
        f"{sum(rss.values()):.0f} ({len(rss)} processes)",
        f"{ch['bytes_on_wire'] / 1e6:.2f} MB",
        f"{result['ratio_wire_vs_logical']:.2f}",
        *[f"{ch['auc'][s.site]:.3f}" for s in data.sites],
    )
    console = Console()
    console.print(t)
    console.print(
        "fedline's bytecode compiled before the runs (as installed): "
        + ("yes" if result["bytecode_compiled"] else "no (--no-compile, or a file did not compile)")
    )
    console.print("peak RSS per process (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()))
    console.print(
        f"updates sent per site: {ch['updates_per_site']}; {ch['updates']} updates, "
        f"{ch['n_params']} parameters, logical payload {ch['logical_bytes'] / 1e6:.2f} MB "
        f"({ch['transfers']} transfers)"
    )
    console.print(
        "bytes on the wire by party: "
        + ", ".join(f"{k} {v / 1e3:.0f} kB" for k, v in ch["wire_by_party"].items())
        + "; published once, by kind: "
        + ", ".join(f"{k} {v / 1e3:.0f} kB" for k, v in ch["published_bytes_by_kind"].items())
    )
    mc = ch["model_crypto"]
    console.print(
        f"model crypto (members only): {mc['per_version_s'] * 1e3:.2f} ms per version (aggregator seals "
        f"{mc['seal_per_version_s'] * 1e3:.2f} ms, each site opens {mc['open_per_site_per_version_s'] * 1e3:.2f}"
        f" ms; weights {mc['weights_bytes']} B, ONNX {mc['onnx_bytes']} B), {mc['total_s'] * 1e3:.1f} ms "
        f"over the run = {100 * mc['share_of_chain']:.2f} % of the chain's wall time (target ≤ 5 %)"
    )
    console.print(
        f"chain / plain loop with DP: {result['ratio_wall_vs_plain_dp']:.1f}× "
        f"({result['ratio_wall_after_startup_vs_plain_dp']:.1f}× after start-up; "
        f"{result['ratio_wall_vs_plain_dp_cold']:.1f}× against the loop started as a process; target 1.5×); "
        f"wire / logical: {result['ratio_wire_vs_logical']:.2f}× counting both links of every message "
        f"(target 1.3×), {result['ratio_delivered_vs_logical']:.2f}× counting each transfer once at its "
        f"receiver"
    )
    starts = ", ".join(f"{k} {v:.2f}" for k, v in ch["edge_start_cpu_s"].items() if v is not None)
    console.print(
        f"CPU: chain {ch['cpu_s']:.1f} s over its {len(ch['cpu_s_by_process'])} processes (each edge's start: "
        f"{starts} s); plain DP loop {plain_dp['cpu_s']:.1f} s in this process, {plain_cold['cpu_s']:.1f} s "
        f"started as a process ({result['ratio_cpu_vs_plain_dp_cold']:.2f}×)"
    )
    if args.quantise != "off":
        console.print(
            f"updates sent {args.quantise}: update bytes / their float32 logical size "
            f"{ch['wire_updates_vs_logical_updates']:.3f}×; site downlink / their float32 models "
            f"{ch['site_downlink_vs_logical_models']:.3f}× (int8 steps); target for the whole "
            f"wire with quantisation: ≤ {result['targets']['wire_vs_logical']}× logical"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
