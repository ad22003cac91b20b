"""``fedline demo``: the whole federation on one machine, as real separate processes.

What runs (each a ``fedline ...`` subprocess with its own generated TOML file):

- a private Mosquitto with a generated config, ACL and password file (or the
  embedded amqtt broker when Mosquitto is not installed, or ``--broker URL``);
- ``fedline aggregator``;
- per site: ``fedline plc-sim`` (a Modbus TCP PLC serving the site's live
  rows), ``fedline edge`` (reads its historian CSV and polls the PLC, trains
  with DP-SGD, sends sealed updates) and ``fedline infer`` (scores the PLC's
  rows with the newest model, hot-reloaded).

Every party reaches the broker through a small TCP proxy of the demo
(:mod:`fedline.netproxy`): it counts the bytes on the wire, and cutting one
site's proxy for a while makes that site intermittent. A separate observer
records every message for the progress view and the traffic audit.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedline.demo.data import DemoData, load_demo_data
from fedline.demo.workspace import Tuning, Workspace, dp_batch_size, make_keys, write_aggregator, write_site

log = logging.getLogger("fedline.demo")
MARKER = ".fedline-demo-run"
AI4I_PLANTS = {"L": 2}  # the bundled file's 6,000 L rows as two plants: four sites in all


@dataclass
class DemoOptions:
    csv: str | None = None
    site_column: str | None = None
    label: str | None = None
    features: list[str] | None = None
    task: str | None = None
    n_sites: int | None = None
    max_rows_per_site: int | None = None
    # site -> N plants of consecutive rows; None: the bundled AI4I file runs its L rows as two plants, so the
    # federation has four sites and keeps publishing from three while one is away
    split_sites: dict[str, int] | None = None
    report_dir: Path = Path("demo-report")
    run_dir: Path = Path(".fedline-run")
    broker: str | None = None  # an existing broker's URL
    protocol: str = "5"  # MQTT version of every party with --broker ("3.1.1" for a broker without MQTT 5)
    embedded: bool = False  # force the embedded broker
    intermittent: str | None = None  # site id; default: the second-largest site
    cut_after_version: int = 2
    cut_s: float = 15.0
    timeout_s: float = 270.0
    tuning: Tuning = field(default_factory=Tuning)
    batch_fraction: float = 0.03  # each site's DP batch = this share of its rows (see report notes)
    splits: int = 10  # the split study's train/test splits after the run (0: none; see fedline/demo/splitstudy.py)
    progress: bool = True


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path


class Processes:
    """The demo's child processes: started in their own session, stopped by signal, logs to files."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[Proc] = []
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: list[str], cwd: Path) -> Proc:
        log_path = self.logs / f"{name}.log"
        fh = log_path.open("ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        popen = subprocess.Popen([sys.executable, "-m", "fedline.cli", *args], cwd=cwd, stdout=fh,
                                 stderr=subprocess.STDOUT, start_new_session=True, env=env)
        fh.close()
        p = Proc(name, popen, log_path)
        self.procs.append(p)
        return p

    def dead(self) -> list[Proc]:
        return [p for p in self.procs if p.popen.poll() is not None]

    def stop(self, names: list[str] | None = None, timeout: float = 10.0) -> None:
        chosen = [p for p in self.procs if names is None or p.name in names]
        for p in chosen:
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in chosen:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def prepare_run_dir(run_dir: Path) -> Path:
    """A fresh run directory; an old demo run there is removed, anything else is refused."""
    run_dir = run_dir.resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / MARKER).exists():
            from broker_bridge.errors import FedlineError

            raise FedlineError(f"{run_dir} exists and is not a fedline demo run directory; choose another --run-dir")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text("created by fedline demo; removed by the next run\n")
    return run_dir


def _load_kwargs(opts: DemoOptions) -> dict[str, Any]:
    """How this run reads its data (:func:`load_demo_data` without the split seed)."""
    return {"csv_path": opts.csv, "site_column": opts.site_column, "label": opts.label, "features": opts.features,
            "task": opts.task, "n_sites": opts.n_sites, "max_rows_per_site": opts.max_rows_per_site,
            "split_sites": opts.split_sites if opts.split_sites is not None else
            (AI4I_PLANTS if opts.csv is None else None)}


def _missed_rounds(cut_state: dict, intermittent: str) -> dict[str, tuple[int, int]]:
    """The rounds the cut-off site missed: versions ``version_at_cut + 1 .. version_at_restore`` were made without it."""
    first, end = cut_state.get("version_at_cut"), cut_state.get("version_at_restore")
    if first is None or end is None or end <= first:
        return {}
    return {intermittent: (int(first), int(end))}


def site_tuning(data: DemoData, opts: DemoOptions) -> dict[str, Tuning]:
    """Per-site settings: the DP batch is a fixed share of the site's rows (same sampling rate everywhere)."""
    out = {}
    for s in data.sites:
        batch = dp_batch_size(len(s.train_rows), opts.batch_fraction)
        out[s.site] = replace(opts.tuning, batch_size=batch)
    return out



class Scorer:
    """Scores an ONNX model on every site's held-out rows (onnxruntime, one thread)."""

    def __init__(self, data: DemoData) -> None:
        self.data = data
        self.inputs = [data.normalise(s.x_test) for s in data.sites]

    def __call__(self, onnx_bytes: bytes) -> dict[str, float]:
        from fedline.demo.baselines import predict_onnx
        from fedline.demo.metrics import score

        out = {}
        for s, x in zip(self.data.sites, self.inputs):
            pred = predict_onnx(onnx_bytes, x)
            if self.data.task == "classification":
                out[s.site] = score("roc_auc", s.y_test, pred)
            else:
                out[s.site] = score("rmse", s.y_test, self.data.untarget(pred))
        return out


def _say(console: Any, text: str) -> None:
    if console is not None:
        console.print(text)


async def run_demo(opts: DemoOptions, console: Any = None) -> dict[str, Any]:
    """Run the demo; returns the report dict (also written to ``opts.report_dir``)."""
    from broker_bridge.client import BrokerSettings
    from broker_bridge.keys import Enrollment
    from broker_bridge.mosquitto import MosquittoProcess, free_port, mosquitto_binary
    from broker_bridge.topics import Topics
    from fedline.demo.audit import TrafficRecorder
    from fedline.demo.monitor import Monitor, site_table
    from fedline.netproxy import TcpProxy

    t0 = time.time()
    from edge.privacy_stream import demo_stream  # per-record vs global-history ε over months, computed meanwhile

    long_stream = asyncio.ensure_future(asyncio.to_thread(
        demo_stream, opts.tuning.epsilon, opts.tuning.delta, opts.tuning.noise_multiplier))
    data = load_demo_data(**_load_kwargs(opts))
    sites = [s.site for s in data.sites]
    _say(console, f"[bold]fedline demo[/]: {data.source.name}, task {data.task}, {len(sites)} sites: "
                  + ", ".join(f"{s.site} ({s.rows} rows, {s.positives} positive)" if data.task == "classification"
                              else f"{s.site} ({s.rows} rows)" for s in data.sites))
    intermittent = opts.intermittent or (sites[1] if len(sites) > 1 else sites[0])
    if intermittent not in sites:
        from broker_bridge.errors import FedlineError

        raise FedlineError(f"--intermittent {intermittent!r} is not a site; sites are {', '.join(sites)}")
    run = prepare_run_dir(opts.run_dir)
    ws = Workspace(run)
    make_keys(ws, sites)
    enrollment = Enrollment.load(ws.keys / "enrollment.json")
    topics = Topics(ws.federation)

    # -- the broker -----------------------------------------------------------------
    mosq = None
    embedded = None
    protocol = "5"
    mosq = MosquittoProcess(ws.broker_dir, federation=ws.federation, sites=sites)  # writes conf, ACL, passwords
    if opts.broker:
        from urllib.parse import urlparse

        u = urlparse(opts.broker)
        host, port = u.hostname or "127.0.0.1", u.port or 1883
        broker_desc = (f"an existing broker at {opts.broker} (MQTT {opts.protocol}; its own ACL and users: the "
                       "demo's generated credentials are sent)")
        protocol = opts.protocol
        mosq = None
    elif mosquitto_binary() and not opts.embedded:
        mosq.start()
        host, port = "127.0.0.1", mosq.port
        broker_desc = (f"a private Mosquitto ({mosquitto_binary()}) on 127.0.0.1:{port} with the generated "
                       f"config, ACL and password file in {ws.broker_dir}")
    else:
        from broker_bridge.embedded import EmbeddedBroker

        mosq = None
        port = free_port()
        host = "127.0.0.1"
        embedded = await EmbeddedBroker(host, port).start()
        # amqtt logs its own QoS 1 retries to slow subscribers as tracebacks; delivery is checked end to end
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
        protocol = "3.1.1"
        broker_desc = (f"the embedded amqtt broker on 127.0.0.1:{port} (MQTT 3.1.1, no ACL: "
                       + ("--embedded was given" if opts.embedded else "mosquitto is not installed") + ")")
    _say(console, f"broker: {broker_desc}")

    proxies: dict[str, TcpProxy] = {}
    for name in ["aggregator", *sites]:
        proxies[name] = await TcpProxy(port, host, name).start()
    ws.broker_url = proxies["aggregator"].url
    ws.site_urls = {s: proxies[s].url for s in sites}
    ws.plc_ports = {s: free_port() for s in sites}
    tunings = site_tuning(data, opts)
    bundled = opts.csv is None
    files = {s.site: write_site(ws, data, s, tunings[s.site], bundled) for s in data.sites}
    agg_toml = write_aggregator(ws, data, opts.tuning)
    if protocol != "5":
        _set_protocol(ws, sites, protocol)

    # -- the observer: progress view and traffic audit --------------------------------
    scorer = Scorer(data)
    monitor = Monitor(topics, sites, enrollment.aggregator.sign_pub, scorer)
    obs = BrokerSettings(url=f"mqtt://{host}:{port}", client_id="demo-observer", username="observer",
                         password_file=str(ws.credentials("observer")), protocol=protocol,  # type: ignore[arg-type]
                         backoff_min_s=0.1, backoff_max_s=1.0, timeout_s=10.0)
    recorder = TrafficRecorder(obs, f"{topics.root}/#", on_message=monitor.on_message)
    await recorder.start()

    procs = Processes(ws.logs)
    report: dict[str, Any] = {}
    cut_state = {"cut": False, "cut_at": None, "restored_at": None}
    try:
        procs.start("aggregator", ["aggregator", "--config", str(agg_toml)], agg_toml.parent)
        for s in data.sites:
            d = ws.site_dir(s.site)
            procs.start(f"plc-{s.site}", ["plc-sim", "--csv", str(files[s.site]["live"]), "--map",
                                          str(files[s.site]["map"]), "--port", str(ws.plc_ports[s.site]),
                                          "--rate", f"{files[s.site]['rate']:.3f}", "--once"], d)
        await asyncio.sleep(0.5)
        for s in data.sites:
            d = ws.site_dir(s.site)
            procs.start(f"edge-{s.site}", ["edge", "--config", str(files[s.site]["site"])], d)
            procs.start(f"infer-{s.site}", ["infer", "--config", str(files[s.site]["line"])], d)
        _say(console, f"started {len(procs.procs)} processes (logs in {ws.logs}); site {intermittent} will lose "
                      f"the broker for {opts.cut_s:.0f} s after version {opts.cut_after_version}")

        await _watch(opts, monitor, procs, proxies, intermittent, cut_state, console, site_table, data.metric)
        # stop the edges first: they publish a last 'offline' status with their final figures
        procs.stop([f"edge-{s}" for s in sites] + [f"infer-{s}" for s in sites])
        await asyncio.sleep(1.0)
        procs.stop()
        await asyncio.sleep(0.3)
    finally:
        procs.stop()
        await recorder.stop()
        for p in proxies.values():
            await p.stop()
        if mosq is not None:
            mosq.stop()
        if embedded is not None:
            await embedded.stop()

    duration = time.time() - t0
    # -- the yardsticks and the audit ---------------------------------------------------
    _say(console, "training the local-only and central baselines (no DP) and auditing the traffic ...")
    report = await asyncio.to_thread(
        build_report, opts, data, ws, monitor, recorder, proxies, tunings, intermittent, cut_state, broker_desc,
        duration)
    if opts.splits > 0:
        _say(console, f"the split study: the same comparison on {opts.splits} train/test splits, in-process ...")
        from fedline.demo.splitstudy import run_split_study

        report["split_study"] = await asyncio.to_thread(
            run_split_study, _load_kwargs(opts), opts.tuning, opts.batch_fraction, data.metric, opts.splits,
            report["baseline_epochs"], _missed_rounds(cut_state, intermittent),
            on_split=lambda seed, r: _say(console, f"  split {seed}: " + ", ".join(
                f"{site} local-only {v['local']:.3f} federated {v['federated']:.3f}" for site, v in r.items())))
    from fedline.demo.report import write_report

    report["long_stream"] = await long_stream
    paths = write_report(report, opts.report_dir)
    report["duration_total_s"] = round(time.time() - t0, 1)
    _say(console, f"report: {paths['md']} ({paths['json'].name}, {paths['png'].name})")
    return report


def _set_protocol(ws: Workspace, sites: list[str], protocol: str) -> None:
    """The embedded broker speaks MQTT 3.1.1: rewrite each generated file's [broker] table."""
    import tomllib

    from fedline.demo.workspace import write_toml

    paths = [ws.aggregator_toml] + [ws.site_dir(s) / n for s in sites for n in ("site.toml", "line.toml")]
    for p in paths:
        doc = tomllib.loads(p.read_text())
        doc["broker"]["protocol"] = protocol
        write_toml(p, doc)


async def _watch(opts: DemoOptions, monitor, procs: Processes, proxies, intermittent: str, cut_state: dict,
                 console: Any, site_table, metric: str) -> None:
    """Run until the target version is reached and the intermittent site is settled, or the timeout."""
    from broker_bridge.errors import FedlineError

    view = monitor.view
    started = time.monotonic()
    target = opts.tuning.versions
    live = None
    if console is not None and opts.progress:
        from rich.live import Live

        live = Live(site_table(view, metric, intermittent, False), console=console, refresh_per_second=2,
                    transient=False)
        live.start()
    try:
        while True:
            await asyncio.sleep(0.5)
            dead = [p for p in procs.dead() if not p.name.startswith("plc-")]
            if dead:
                p = dead[0]
                raise FedlineError(f"{p.name} exited with {p.popen.returncode}; last lines of {p.log_path}:\n"
                                   + _tail(p.log_path))
            now = time.monotonic()
            if not cut_state["cut"] and cut_state["cut_at"] is None and view.version >= opts.cut_after_version:
                proxies[intermittent].cut()
                cut_state.update(cut=True, cut_at=round(now - started, 1), version_at_cut=view.version,
                                 counter_at_cut=int(view.sites[intermittent].status.get("counter") or 0))
            if cut_state["cut"] and now - started - cut_state["cut_at"] >= opts.cut_s:
                proxies[intermittent].restore()
                cut_state.update(cut=False, restored_at=round(now - started, 1), version_at_restore=view.version)
            if live is not None:
                live.update(site_table(view, metric, intermittent, cut_state["cut"]))
            if now - started > opts.timeout_s:
                log.warning("demo timeout after %.0f s at version %d", now - started, view.version)
                break
            settled = cut_state["restored_at"] is not None and _settled(view, intermittent)
            if settled:  # what the report accounts for: an update sealed after this (sites train on every
                # new version) stays safely in that site's outbox when the demo stops
                sv = view.sites[intermittent]
                n = int(sv.status.get("counter") or 0)  # the status lags the receipts: count up to it
                cut_state["settled"] = {"counter": n,
                                        "verdicts": {c: dict(r) for c, r in sv.verdicts.items() if 0 < c <= n},
                                        "outbox_depth": sv.status.get("outbox_depth")}
            if view.version >= target and settled:
                break
            spent = [sv.status.get("publishing") == "budget_exhausted" for sv in view.sites.values()]
            if settled and all(spent) and view.version >= 1:
                log.warning("every site has spent its privacy budget at version %d: stopping", view.version)
                break
    finally:
        if live is not None:
            live.stop()
            console.print()


def _settled(view, site: str) -> bool:
    """The site's outbox is empty and every update it sent has a final verdict."""
    sv = view.sites[site]
    st = sv.status
    counter = int(st.get("counter") or 0)
    if counter == 0 or st.get("outbox_depth", 1) != 0:
        return False
    final = [c for c, r in sv.verdicts.items() if r.get("verdict") in ("applied", "stale", "rejected", "buffered")]
    return len(final) >= counter


def build_report(opts: DemoOptions, data: DemoData, ws: Workspace, monitor, recorder, proxies, tunings,
                 intermittent: str, cut_state: dict, broker_desc: str, duration: float) -> dict[str, Any]:
    """Everything the report says, from the wire, the sites' files and the in-process baselines."""
    from fedline.demo.audit import RawRecordDetector, audit
    from fedline.demo.baselines import TrainSettings, local_and_central
    from fedline.demo.metrics import score
    from fedline.demo.workspace import model_table
    from models.spec import ModelSpec

    view = monitor.view
    t = opts.tuning
    spec_doc = model_table(data, t)
    spec = ModelSpec.from_dict({**spec_doc, "personal": []})
    rounds = max([int(s.status.get("counter") or 0) for s in view.sites.values()] + [1])
    base_settings = TrainSettings(epochs=max(1, t.epochs * rounds), batch_size=64, lr=0.1, momentum=0.9, seed=t.seed)
    local, central = local_and_central(data, spec, base_settings)
    x_pool = np.concatenate([data.normalise(s.x_test) for s in data.sites])
    y_pool = np.concatenate([s.y_test for s in data.sites])

    final_version = max(view.onnx) if view.onnx else None
    final_onnx = view.onnx.get(final_version) if final_version is not None else None
    fed = Scorer(data)(final_onnx) if final_onnx else {}
    personalised = _personalised(data, ws) if t.personal_head else {}

    raw = np.concatenate([np.concatenate([s.x_train, s.x_test]) for s in data.sites])
    # a record is its measured values: a leak of those alone must count (the computed ones follow from them)
    detector = RawRecordDetector(raw[:, :data.n_measured], data.normalise(raw)[:, :data.n_measured])

    def kind(topic: str) -> str:
        try:
            return monitor.topics.parse(topic).kind
        except Exception:
            return "other"

    audit_result = audit(recorder.messages, detector, kind)
    # central on the pooled held-out rows
    central_pooled = None
    with contextlib.suppress(Exception):
        from fedline.demo.baselines import predict, train_plain

        params = train_plain(spec, np.concatenate([data.normalise(s.x_train) for s in data.sites]),
                             np.concatenate([data.target(s.y_train) for s in data.sites]), base_settings)
        pred = predict(spec, params, x_pool)
        central_pooled = score(data.metric, y_pool, pred if data.task == "classification" else data.untarget(pred))

    site_docs = []
    for i, s in enumerate(data.sites):
        sv = view.sites[s.site]
        st = sv.status
        snap = cut_state.get("settled") if s.site == intermittent else None
        verdicts = snap["verdicts"] if snap else sv.verdicts
        pend = sum(1 for r in verdicts.values() if r.get("verdict") == "buffered")

        def count(verdict: str, verdicts=verdicts) -> int:
            return sum(1 for r in verdicts.values() if r.get("verdict") == verdict)

        site_docs.append({
            "site": s.site, "key": s.key, "rows": s.rows, "rows_train": len(s.train_rows), "rows_test": len(s.test_rows),
            "positives": s.positives if data.task == "classification" else None,
            "test_positives": int(np.sum(s.y_test > 0.5)) if data.task == "classification" else None,
            "metric_local": local[i], "metric_federated": fed.get(s.site),
            "metric_personalised": personalised.get(s.site), "metric_central": central[i],
            "epsilon": st.get("epsilon"), "epsilon_budget": t.epsilon, "delta": t.delta,
            "updates_sent": snap["counter"] if snap else int(st.get("counter") or 0), "bytes_sent": sv.update_bytes,
            "updates_sealed_after_settled": (int(st.get("counter") or 0) - snap["counter"]) if snap else None,
            "receipts": {"applied": count("applied"), "stale": count("stale"), "rejected": count("rejected"),
                         "buffered_pending": pend},
            "staleness_mean": float(np.mean(sv.staleness)) if sv.staleness else None,
            "staleness_max": int(max(sv.staleness)) if sv.staleness else None,
            "outbox_pending": snap["outbox_depth"] if snap else st.get("outbox_depth"),
            "outbox_max_seen": sv.max_outbox_depth,
            "publishing": st.get("publishing"),
            "batch_size": tunings[s.site].batch_size,
            "intermittent": s.site == intermittent,
            "wire_bytes": proxies[s.site].stats.total,
            "predictions": _count_lines(ws.site_dir(s.site) / "predictions.jsonl"),
        })
    totals = view.totals()
    cut = cut_state
    notes = [
        f"Data: each site's rows are split 80/20 (stratified by label for classification, seed {data.seed}); "
        f"the 20 % is never given to any process and scores every model. Of each site's 80 %, the first "
        f"{100 - 100 * t.live_fraction:.0f} % is the plant's history, replayed from a CSV by the edge agent's "
        f"`csv` source at full speed, and the last {100 * t.live_fraction:.0f} % is served live by the site's "
        f"simulated PLC (`fedline plc-sim`, Modbus TCP, its live rows spread over {t.plc_seconds:g} s) which the "
        "edge agent and the line "
        "inference poll. Playing 10,000 rows through a PLC at a realistic rate would take hours; the history "
        "replay is what a plant joining a federation with an existing historian would do.",
        "Features are normalised by engineering ranges "
        + ("from the register map (firmware_adapters/maps/ai4i2020.toml; the PLC's computed quantities power, "
           "temperature difference and tool strain are served as extra float32 registers after its raw tags, "
           "see each site's plc-map.toml)" if not data.ranges_from_data else
           "derived from the pooled file with a 5 % margin (a real deployment writes the machine's ranges into "
           "the site file; deriving them from data leaks a little and is done here only for convenience)") + ".",
        f"Model: MLP {len(data.features)}→{'→'.join(map(str, t.hidden))}→1"
        + (", the head (last layer) personal: it stays at each site and the line serves global body + own head"
           if t.personal_head else "") + ".",
        f"Federation (tuned defaults): DP-SGD at every site with noise multiplier {t.noise_multiplier}, clip "
        f"{t.max_grad_norm}, budget ε={t.epsilon}, δ={t.delta:g}; each site's batch is {100 * opts.batch_fraction:g} % "
        f"of its rows (the same sampling rate everywhere, so every site's ε grows alike per round; a small "
        f"sampling rate buys many cheap steps, which this small model needs more than low noise per step); "
        f"SGD lr {t.lr}, momentum {t.momentum}, {t.epochs} epochs per update, "
        + ("a round as soon as a new global version arrives (training.on_new_model: each version gets a fresh "
           "update from every site, so ε is not spent twice on one base; this lifted the global model from about "
           "0.88/0.82 to 0.92/0.96 ROC AUC on L/M in our runs) and otherwise every "
           if t.on_new_model else "a round every ")
        + f"{t.round_every_s:g} s; aggregator FedBuff K={t.buffer_size} (a buffer short of K is reduced "
        f"{t.buffer_timeout_s:g} s after its first update: while a site is away, versions come from the others "
        f"and none of them trains twice on one base to fill the buffer), {t.staleness} staleness weighting "
        f"(a = {t.staleness_a:g}), max staleness {t.max_staleness}; each edge outbox holds at most 2 updates "
        "and then stops training (policy stop_training), so a cut-off site does not spend its budget on updates "
        "that will arrive too stale. Inputs are centred and scaled by the "
        "machine's nominal operating point (public figures, the same at every site) where the data has one.",
        "What was tuned, on the plain single-process loop (fedline/demo/plainloop.py, the same training code) "
        "and then on this demo: the batch share (20 %, 10 %, 3 %) with the noise multiplier that keeps ε under "
        "8 for about 15 rounds (2.0, 1.5, 1.0), the learning rate (0.05-3) and momentum, 1-3 epochs per update, "
        "the hidden widths (8 to 32-32), a personal head (it did not help: its DP-trained head is noisiest at "
        "the smallest site), server momentum (no help), the staleness weighting and cut-off (stale updates "
        "from the cut-off site pulled the model back; a = 1 and max staleness 2 stop that), and the input "
        "centring (the largest single gain: it lifted the global model from about 0.78 to 0.93 ROC AUC on L).",
        "Second tuning pass (plain loop, the demo's split, training seed 0 unless said; settings were judged on "
        "L and M and on the no-DP ceiling, H's held-out rows only read): (1) the PLC's engineering quantities as extra registers and "
        "features for every model alike (shaft power, process-air temperature difference, tool strain = torque x "
        "tool wear; the AI4I failure modes are thresholds on these; load_demo_data(derived=True)). Measured on H, "
        "training seeds 0/1/2, plain loop, 15 rounds: local-only 0.939/0.911/0.893 with them against "
        "0.907/0.916/0.926 without; DP global model 0.922/0.851/0.884 with them against 0.913/0.925/0.906 without "
        "(federated ahead of local-only in 0 of 3 seeds with them, 2 of 3 without), so they are not in the "
        "defaults. (2)-(4) were run with those features. (2) More training: without DP, 4 epochs per update or 30 rounds reach "
        "0.95 on H, but with ε ≤ 8 the noise multiplier must rise (1.1 for 4 epochs x 15 rounds, 1.85 at a 10 % "
        "batch share, 2.9 at 20 %) and every such setting stayed at 0.89-0.92 on H and 0.93-0.96 on L. (3) Smaller "
        "models (16, 16-16), a smaller clip (0.2, 0.5) with a larger learning rate, server momentum 0.5: worse or "
        "no better. (4) Weighting failures 5x or 10x in the loss at every site: no change for the DP model (its "
        "per-sample clipping caps a failure's gradient anyway) while the local-only model of H overfit its 17 "
        "training failures (0.75-0.84); rejected, since it helps the comparison only by hurting the baseline. "
        "(5) Without the features, 4 training seeds: the DP global model reached 0.913/0.904/0.909/0.902 on H "
        "(local-only 0.907-0.926 by seed: a tie within the noise of 4 held-out failures); averaging the iterates "
        "of a local round (EMA 0.9/0.97) or the last 3-5 global versions did not raise it. In this multi-process "
        "demo the global model is weaker than in the plain loop (about 0.85 on H, 0.92 on L after 15 versions, "
        "still rising): FedBuff K=3 versions mix whichever 3 updates arrive first, and ε ≤ 8 at σ=1.0 stops "
        "each site after about 18 updates. "
        "(6) A wider model (64-64) for every model: plain loop, DP global model on H 0.917/0.911/0.811/0.911 "
        "against local-only 0.897/0.878/0.895/0.889 (seeds 0-3), one demo run 0.835 against 0.894; the "
        "local-only model of H is weaker at 64-64 than at 32-32, so adopting it would mostly weaken the "
        "yardstick: not adopted. Two demo runs with these defaults gave 0.847 against 0.920 and 0.934 against "
        "0.918 on H: the outcome is decided by the DP noise of the run. "
        "Result of that pass: with ε ≤ 8 the DP-trained global model did not beat H's local-only model (trained "
        "without noise) in our runs on this split, so the defaults were left as they were rather than tuned "
        "until the check passes by chance; the check in this report gives this run's own outcome.",
        "Third tuning pass (plain loop on the demo's split unless said, then this demo): (1) the clip norm. "
        "At clip 1.0 per-sample clipping cut the failures' gradients down to the size of the normal rows' ones; "
        "clip 3.0 with lr 0.033 (the same largest step) lifted the DP global model on every site: H over 5 "
        "training seeds 0.934/0.909/0.915/0.912/0.884 against 0.913/0.904/0.909/0.902/0.889 at clip 1 "
        "(local-only 0.907/0.894/0.907/0.901/0.899); clip 5 and 10 were worse, 0.03-0.3 no better. "
        "(2) The asynchronous composition. The lineage of each version (aggregator checkpoints) showed that "
        "while M was cut off FedBuff K=3 filled up with two updates of H or L on one base (their fallback "
        "timer), and that the last version was three M updates on one base once L and H had spent their "
        "budget (H fell from 0.90 to 0.85 on that version). With the aggregator's buffer_timeout_s, a 5 s "
        "fallback timer and the bounded outbox, every version is one fresh update per live site at staleness "
        "0, as in the plain loop; M's stale drops went from 7 to 2 and the global model from 0.92-0.93 / "
        "0.87-0.96 to 0.93-0.94 / 0.93-0.95 on L / M. (3) Weighting each site by its rows squared (inverse "
        "variance of its DP noise): better on M, worse on H (0.86-0.91 over 5 seeds): not adopted. (4) A "
        "noise-free local fine-tune of the global model at each site (plain, and Ditto's proximal term with "
        "λ 0.01-1, 5-20 epochs; it would never leave the plant): on the demo's split +0.00-0.01 on H over the "
        "global model and a large gain on M (0.94 to 0.97), but on other splits it fell to H's local-only level "
        "(0.80-0.87) where H's own rows are unrepresentative: not built. Outcome: on H the DP global model "
        "and the noise-free local-only model stay within the noise of four held-out failures (three demo runs "
        "with these defaults: 0.890, 0.893 and 0.857 against 0.923, 0.907 and 0.906; in the last one H fell "
        "from 0.907 to 0.857 over the final five versions as L's and M's updates pulled the shared model "
        "their way); L and M gained.",
        "Fourth pass: (1) more training variants in the plain loop, judged over split seeds 0-2 x training "
        "seeds 0-1 (six runs) rather than on one split: an output bias set to the prior failure rate, Adam, "
        "tanh and ELU activations, narrower (8-8, 16, 16-16) and wider (64) models, 1 epoch x 30 rounds, "
        "σ 1.2 x 35 rounds, the PRV accountant (σ 1.0 x 22 rounds within ε 8; it is also 5x slower per "
        "round on the edge), the product type as an input: none beat these defaults (mean over the six runs "
        "H 0.933, L 0.942, M 0.934). (2) The PLC used to serve 10 % of each site's training rows over 150 s, "
        "so about a third of them reached the edge before the run ended while the baselines trained on all "
        "of them; it now serves 5 % over 30 s. (3) Which of H's 21 failures are held out decides how good a "
        "model trained on H's other rows can look: over split seeds 0-9 H's local-only model scores "
        "0.64-0.99, and this demo's split (seed 0) is one of the two where it is strongest (0.907). The "
        "federated model beats it on H in 8 of 10 splits (mean gain +0.083 with M missing the versions it "
        "missed in a typical run, +0.106 without), while on split 0 the two tie (plain loop 0.874-0.934 by "
        "training seed; six demo runs 0.915, 0.847, 0.907, 0.918, 0.912, 0.889 against 0.906-0.907). So the demo now runs the split "
        "study after the federation and reports both: this run's comparison and the study's.",
        f"Baselines (no DP, in-process, the edge agent's own training code): local-only and central use batch 64, "
        f"SGD lr 0.1 momentum 0.9 (a good non-private setting) for {base_settings.epochs} epochs, the number of "
        "epochs the busiest site spent in the federation.",
        f"Intermittent site {intermittent}: its link to the broker (a TCP proxy) was cut at {cut.get('cut_at')} s "
        f"and restored at {cut.get('restored_at')} s (global versions {cut.get('version_at_cut')} to "
        f"{cut.get('version_at_restore')} were made without it); its agent kept training into its outbox "
        f"meanwhile and sent the backlog on reconnect, where the aggregator weighted it down by staleness "
        f"(or dropped it, with a signed 'stale' receipt, past max staleness).",
        f"Broker: {broker_desc}.",
    ]
    return {
        "task": data.task, "metric": data.metric,
        "data": {"source": str(data.source), "label": data.label, "features": data.features,
                 "site_column": data.site_column, "ranges_from_data": data.ranges_from_data},
        "sites": site_docs,
        "metric_central": central_pooled,
        "metric_central_note": "central model (pooled training rows, no DP) on the pooled held-out rows",
        "updates": {"applied": totals["applied"], "stale_dropped": totals["stale"], "rejected": totals["rejected"],
                    "buffered_pending": totals["buffered"]},
        "model_versions": view.version,
        "final_version_scored": final_version,
        "bytes_on_wire": sum(p.stats.total for p in proxies.values()),
        "raw_records_on_wire": audit_result.raw_records,
        "audit": audit_result.to_dict(),
        "duration_s": round(duration, 1),
        "baseline_epochs": base_settings.epochs,
        "history": view.history,
        "intermittent": {"site": intermittent, **{k: v for k, v in cut.items() if k != "settled"}},
        "broker": broker_desc,
        "malformed_seen": view.malformed,
        "notes": notes,
    }


def _personalised(data: DemoData, ws: Workspace) -> dict[str, float]:
    """Each site's own ONNX (global body + its head) from its model dir, on its held-out rows."""
    from edge.inference.model_dir import read_model, read_pointer
    from fedline.demo.baselines import predict_onnx
    from fedline.demo.metrics import score

    out = {}
    for s in data.sites:
        try:
            ptr = read_pointer(ws.site_dir(s.site) / "models")
            blob = read_model(ws.site_dir(s.site) / "models", ptr) if ptr else None
        except Exception:
            blob = None
        if not blob:
            continue
        pred = predict_onnx(blob, data.normalise(s.x_test))
        out[s.site] = score(data.metric, s.y_test, pred if data.task == "classification" else data.untarget(pred))
    return out


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as fh:
            return sum(1 for _ in fh)
    except OSError:
        return 0
