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
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedline.demo.data import DemoData, load_demo_data
from fedline.demo.workspace import Tuning, Workspace, dp_batch_size, make_keys, write_aggregator, write_site
from fedline.launch import Launcher

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
    group_column: str | None = None  # a unit (machine, engine, batch): held-out rows are whole units
    rows_independent: bool | None = None  # random held-out rows (default: only for the bundled AI4I file)
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
    # each site's DP batch = this share of its rows (the same sampling rate q = 1/10 everywhere); with Tuning's σ and lr
    # (docs/tuning.md, sixteenth pass; 3 % with σ 1.0 and lr 0.033 before)
    batch_fraction: float = 0.1
    splits: int = 10  # the split study's train/test splits after the run (0: none; see fedline/demo/splitstudy.py)
    progress: bool = True
    # enrol a spare site that runs nothing and revoke it once this version exists (fedline/demo/revocation.py)
    revoke_spare_after_version: int | None = None


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
    return {
        "csv_path": opts.csv,
        "site_column": opts.site_column,
        "label": opts.label,
        "features": opts.features,
        "task": opts.task,
        "n_sites": opts.n_sites,
        "max_rows_per_site": opts.max_rows_per_site,
        "split_sites": opts.split_sites
        if opts.split_sites is not None
        else (AI4I_PLANTS if opts.csv is None else None),
        "group_column": opts.group_column,
        "rows_independent": opts.rows_independent,
    }


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
        batch = dp_batch_size(int((~data.validation_mask(s)).sum()), opts.batch_fraction)  # of the rows it trains on
        out[s.site] = replace(opts.tuning, batch_size=batch)
    return out


class Scorer:
    """Scores an ONNX model on every site's held-out rows (onnxruntime, one thread)."""

    def __init__(self, data: DemoData) -> None:
        self.data = data
        self.inputs = [data.normalise(s.x_test) for s in data.sites]

    def __call__(self, onnx_bytes: bytes) -> dict[str, float]:
        from fedline.demo.baselines import predict_onnx
        from models.metrics import score

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
    """Run the demo; returns the report dict (also written to ``opts.report_dir``).

    The phases: the data and the keys; the broker (:mod:`fedline.demo.broker`) and one proxy per party;
    each party's files; the observer; the federation's processes, watched while one site is cut off
    (:mod:`fedline.demo.watch`); then the yardsticks, the audit and the split study (:func:`_conclude`).
    """
    from edge.privacy_stream import demo_stream  # per-record vs global-history ε over months, computed meanwhile
    from fedline.demo.broker import DemoBroker

    t0 = time.time()
    long_stream = asyncio.ensure_future(
        asyncio.to_thread(demo_stream, opts.tuning.epsilon, opts.tuning.delta, opts.tuning.noise_multiplier)
    )
    data = load_demo_data(**_load_kwargs(opts))
    sites = [s.site for s in data.sites]
    _say(console, _describe(data))
    intermittent = _intermittent(opts, sites)
    ws = Workspace(prepare_run_dir(opts.run_dir))
    make_keys(ws, sites)
    spare = None
    if opts.revoke_spare_after_version is not None:
        from fedline.demo.revocation import SpareRevocation

        spare = SpareRevocation(ws, opts.revoke_spare_after_version)

    broker = await DemoBroker.start(opts, ws, sites)
    _say(console, f"broker: {broker.description}")
    proxies: dict[str, Any] = {}
    cut_state: dict[str, Any] = {"cut": False, "cut_at": None, "restored_at": None}
    try:
        proxies = await _proxies(ws, broker, sites)
        tunings = site_tuning(data, opts)
        files = {s.site: write_site(ws, data, s, tunings[s.site], opts.csv is None) for s in data.sites}
        agg_toml = write_aggregator(ws, data, opts.tuning, {s: t.batch_size for s, t in tunings.items()})
        if broker.protocol != "5":
            _set_protocol(ws, sites, broker.protocol)
        monitor, recorder = await _observe(ws, data, broker)
        try:
            await _run_federation(
                opts, ws, data, files, agg_toml, monitor, proxies, intermittent, cut_state, console, spare
            )
        finally:
            await recorder.stop()
    finally:
        for px in proxies.values():
            await px.stop()
        await broker.stop()

    report = await _conclude(
        opts, data, ws, monitor, recorder, proxies, tunings, intermittent, cut_state, broker, t0, console
    )
    report["long_stream"] = await long_stream
    if spare is not None:
        report["revocation"] = spare.report()
    from fedline.demo.report import write_report

    paths = write_report(report, opts.report_dir)
    report["duration_total_s"] = round(time.time() - t0, 1)
    _say(console, f"report: {paths['md']} ({paths['json'].name}, {paths['png'].name})")
    return report


def _describe(data: DemoData) -> str:
    return f"[bold]fedline demo[/]: {data.source.name}, task {data.task}, {len(data.sites)} sites: " + ", ".join(
        f"{s.site} ({s.rows} rows, {s.positives} positive)"
        if data.task == "classification"
        else f"{s.site} ({s.rows} rows)"
        for s in data.sites
    )


def _intermittent(opts: DemoOptions, sites: list[str]) -> str:
    """The site the demo cuts off: ``--intermittent``, else the second one listed."""
    site = opts.intermittent or (sites[1] if len(sites) > 1 else sites[0])
    if site not in sites:
        from broker_bridge.errors import FedlineError

        raise FedlineError(f"--intermittent {site!r} is not a site; sites are {', '.join(sites)}")
    return site


async def _proxies(ws: Workspace, broker: Any, sites: list[str]) -> dict[str, Any]:
    """One TCP proxy per party (counts its bytes; cutting it makes the party intermittent); sets the URLs."""
    from broker_bridge.mosquitto import free_port
    from fedline.netproxy import TcpProxy

    proxies: dict[str, Any] = {}
    for name in ["aggregator", *sites]:
        proxies[name] = await TcpProxy(broker.port, broker.host, name).start()
    scheme = "mqtts" if ws.ca_file else "mqtt"  # the proxies pass TLS through untouched
    ws.broker_url = proxies["aggregator"].url.replace("mqtt:", f"{scheme}:", 1)
    ws.site_urls = {s: proxies[s].url.replace("mqtt:", f"{scheme}:", 1) for s in sites}
    ws.plc_ports = {s: free_port() for s in sites}
    return proxies


async def _observe(ws: Workspace, data: DemoData, broker: Any) -> tuple[Any, Any]:
    """The observer (progress view, scores) on a recorder of every message (the traffic audit)."""
    from broker_bridge.client import BrokerSettings
    from broker_bridge.keys import Enrollment, KeyPair
    from broker_bridge.observer import Observer
    from broker_bridge.topics import Topics
    from fedline.demo.audit import TrafficRecorder

    sites = [s.site for s in data.sites]
    topics = Topics(ws.federation)
    enrollment = Enrollment.load(ws.keys / "enrollment.json")
    # receipts are sealed to their site and models to the members: the monitor holds the keys the demo made
    monitor = Observer(
        topics,
        sites,
        only_sites=True,
        aggregator_sign_pub=enrollment.aggregator.sign_pub,
        site_keys={s: KeyPair.load(ws.keys / f"{s}.key") for s in sites},
        score=Scorer(data),
    )
    obs = BrokerSettings(
        url=f"{'mqtts' if ws.ca_file else 'mqtt'}://{broker.host}:{broker.port}",
        ca_file=ws.ca_file,
        client_id="demo-observer",
        username="observer",
        password_file=str(ws.credentials("observer")),
        protocol=broker.protocol,
        backoff_min_s=0.1,
        backoff_max_s=1.0,
        timeout_s=10.0,
    )
    recorder = TrafficRecorder(obs, f"{topics.root}/#", on_message=monitor.on_message)
    await recorder.start()
    return monitor, recorder


async def _run_federation(
    opts: DemoOptions,
    ws: Workspace,
    data: DemoData,
    files: dict[str, dict[str, Any]],
    agg_toml: Path,
    monitor: Any,
    proxies: dict[str, Any],
    intermittent: str,
    cut_state: dict[str, Any],
    console: Any,
    spare: Any,
) -> None:
    """Start the aggregator, each site's edge and line, and its PLC once the edge is online; watch until done; stop
    the edges first."""
    from fedline.demo.monitor import site_table
    from fedline.demo.watch import CutSchedule, watch

    procs = Launcher(ws.logs, json_logs=False)  # the demo's logs are for people to read
    try:
        procs.start("aggregator", ["aggregator", "--config", str(agg_toml)], cwd=agg_toml.parent)
        for s in data.sites:
            d = ws.site_dir(s.site)
            procs.start(f"edge-{s.site}", ["edge", "--config", str(files[s.site]["site"])], cwd=d)
            procs.start(f"infer-{s.site}", ["infer", "--config", str(files[s.site]["line"])], cwd=d)
        # each PLC once its agent is online, beside the watch (so the cut schedule does not wait for the last agent)
        plcs = asyncio.create_task(_start_plcs(procs, data, ws, files, monitor.view))
        _say(
            console,
            f"started {len(procs.procs)} processes (logs in {ws.logs}), each site's PLC to follow once its agent is "
            f"online; site {intermittent} will lose the broker for {opts.cut_s:.0f} s after version "
            f"{opts.cut_after_version}",
        )
        cut = CutSchedule(opts, proxies, intermittent, cut_state)
        try:
            await watch(
                opts, monitor, procs, cut, console, site_table, data.metric, spare.step if spare is not None else None
            )
        finally:
            plcs.cancel()
        # stop the edges first: they publish a last 'offline' status with their final figures
        sites = [s.site for s in data.sites]
        procs.stop_all(10.0, [f"edge-{s}" for s in sites] + [f"infer-{s}" for s in sites])
        await asyncio.sleep(1.0)
        procs.stop_all(10.0)
        await asyncio.sleep(0.3)
    finally:
        procs.stop_all(10.0)


async def _start_plcs(
    procs: Launcher, data: DemoData, ws: Workspace, files: dict[str, Any], view: Any, wait_s: float = 60.0
) -> None:
    """Each site's PLC, started once its agent says "online" (or after ``wait_s``).

    Why not before the agents: the PLC serves its live rows on its own clock from its start, and rows it served
    before the agent first polled it never reach the agent. Started first, an agent that took 14 s to start under
    load missed half its live rows (docs/tuning.md, seventeenth pass). An agent publishes "online" about a second
    after its sources start polling (and retrying a PLC not yet listening, at most ``reconnect_max_s`` apart), so
    what it can still miss is about a second of rows; the report counts what each agent held (``stored_rows``)."""
    waiting = [s.site for s in data.sites]
    deadline = time.monotonic() + wait_s
    while waiting:
        late = time.monotonic() > deadline
        for site in list(waiting):
            sv = view.sites.get(site)
            if late or (sv is not None and sv.online_statuses > 0):
                f = files[site]
                plc = ["plc-sim", "--csv", str(f["live"]), "--map", str(f["map"]), "--port", str(ws.plc_ports[site])]
                procs.start(f"plc-{site}", [*plc, "--rate", f"{f['rate']:.3f}", "--once"], cwd=ws.site_dir(site))
                waiting.remove(site)
        await asyncio.sleep(0.1)


async def _conclude(
    opts: DemoOptions,
    data: DemoData,
    ws: Workspace,
    monitor: Any,
    recorder: Any,
    proxies: dict[str, Any],
    tunings: dict[str, Tuning],
    intermittent: str,
    cut_state: dict[str, Any],
    broker: Any,
    t0: float,
    console: Any,
) -> dict[str, Any]:
    """The yardsticks (local-only and central baselines, no DP), the traffic audit, and the split study."""
    duration = time.time() - t0
    _say(console, "training the local-only and central baselines (no DP) and auditing the traffic ...")
    report = await asyncio.to_thread(
        build_report,
        opts,
        data,
        ws,
        monitor,
        recorder,
        proxies,
        tunings,
        intermittent,
        cut_state,
        broker.description,
        duration,
    )
    if opts.splits > 0:
        _say(console, f"the split study: the same comparison on {opts.splits} train/test splits, in-process ...")
        from fedline.demo.splitstudy import run_split_study

        report["split_study"] = await asyncio.to_thread(
            run_split_study,
            _load_kwargs(opts),
            opts.tuning,
            opts.batch_fraction,
            data.metric,
            opts.splits,
            _missed_rounds(cut_state, intermittent),
            on_split=lambda seed, r: _say(
                console,
                f"  split {seed}: "
                + ", ".join(
                    f"{site} local-only {v['local']:.3f} federated {v['federated']:.3f} served {v['served']:.3f} "
                    f"({v['served_kind']})"
                    for site, v in r.items()
                ),
            ),
        )
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


def build_report(
    opts: DemoOptions,
    data: DemoData,
    ws: Workspace,
    monitor,
    recorder,
    proxies,
    tunings,
    intermittent: str,
    cut_state: dict,
    broker_desc: str,
    duration: float,
) -> dict[str, Any]:
    """Everything the report says, from the wire, the sites' files and the in-process baselines."""
    from fedline.demo import secure_aggregation
    from fedline.demo.audit import RawRecordDetector, audit
    from fedline.demo.baselines import TrainSettings, local_and_central, predict_onnx
    from fedline.demo.workspace import baseline_epochs, model_table
    from models.metrics import score
    from models.spec import ModelSpec

    view = monitor.view
    t = opts.tuning
    spec_doc = model_table(data, t)
    spec = ModelSpec.from_dict({**spec_doc, "personal": []})
    base_settings = TrainSettings(epochs=baseline_epochs(t), batch_size=64, lr=0.1, momentum=0.9, seed=t.seed)
    local, central = local_and_central(data, spec, base_settings)
    x_pool = np.concatenate([data.normalise(s.x_test) for s in data.sites])
    y_pool = np.concatenate([s.y_test for s in data.sites])

    final_version = max(view.onnx) if view.onnx else None
    final_onnx = view.onnx.get(final_version) if final_version is not None else None
    fed = Scorer(data)(final_onnx) if final_onnx else {}
    served = _served(data, ws)
    fed_pooled = None
    if final_onnx:
        pred = predict_onnx(final_onnx, x_pool)
        fed_pooled = score(data.metric, y_pool, pred if data.task == "classification" else data.untarget(pred))

    raw = np.concatenate([np.concatenate([s.x_train, s.x_test]) for s in data.sites])
    # a record is its measured values: a leak of those alone must count (the computed ones follow from them)
    detector = RawRecordDetector(raw[:, : data.n_measured], data.normalise(raw)[:, : data.n_measured])

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

        fit = [data.fit_rows(s) for s in data.sites]
        params = train_plain(
            spec, np.concatenate([f[0] for f in fit]), np.concatenate([f[1] for f in fit]), base_settings
        )
        pred = predict(spec, params, x_pool)
        central_pooled = score(data.metric, y_pool, pred if data.task == "classification" else data.untarget(pred))

    stored = {s.site: r for s in data.sites if (r := stored_rows(ws.site_dir(s.site) / "state")) is not None}
    site_docs = []
    for i, s in enumerate(data.sites):
        sv = view.sites[s.site]
        st = sv.status
        snap = cut_state.get("settled") if s.site == intermittent else None
        verdicts = snap["verdicts"] if snap else sv.verdicts
        pend = sum(1 for r in verdicts.values() if r.get("verdict") == "buffered")

        def count(verdict: str, verdicts=verdicts) -> int:
            return sum(1 for r in verdicts.values() if r.get("verdict") == verdict)

        site_docs.append(
            {
                "site": s.site,
                "key": s.key,
                "rows": s.rows,
                "rows_train": len(s.train_rows),
                "rows_test": len(s.test_rows),
                "positives": s.positives if data.task == "classification" else None,
                "test_positives": int(np.sum(s.y_test > 0.5)) if data.task == "classification" else None,
                "metric_local": local[i],
                "metric_federated": fed.get(s.site),
                "metric_served": served.get(s.site, {}).get("metric"),
                "served_kind": served.get(s.site, {}).get("kind"),
                # a blend's local-only share w (edge/blend.py); None when one candidate is served
                "served_weight": (served.get(s.site, {}).get("choice") or {}).get("weight"),
                "served": served.get(s.site, {}).get("choice"),
                "metric_central": central[i],
                "rows_validation": int(data.validation_mask(s).sum()),
                # what the site's agent held at the end (training, validation): fewer than it was sent when its PLC
                # served live rows before the agent first read it (docs/tuning.md, seventeenth pass)
                "rows_stored": stored.get(s.site),
                "epsilon": st.get("epsilon"),
                "epsilon_budget": t.epsilon,
                "delta": t.delta,
                "updates_sent": snap["counter"] if snap else sv.updates_sent,
                "bytes_sent": sv.update_bytes,
                "updates_sealed_after_settled": (sv.updates_sent - snap["counter"]) if snap else None,
                "receipts": {
                    "applied": count("applied"),
                    "stale": count("stale"),
                    "rejected": count("rejected"),
                    "buffered_pending": pend,
                },
                "staleness_mean": float(np.mean(sv.staleness)) if sv.staleness else None,
                "staleness_max": int(max(sv.staleness)) if sv.staleness else None,
                "outbox_pending": snap["outbox_depth"] if snap else st.get("outbox_depth"),
                "outbox_max_seen": sv.max_outbox_depth,
                "publishing": st.get("publishing"),
                "batch_size": tunings[s.site].batch_size,
                "intermittent": s.site == intermittent,
                "wire_bytes": proxies[s.site].stats.total,
                "predictions": _count_lines(ws.site_dir(s.site) / "predictions.jsonl"),
            }
        )
    totals = view.totals()
    cut = cut_state
    from fedline.demo.notes import run_notes

    notes = run_notes(data, t, opts.batch_fraction, tunings, intermittent, cut_state, broker_desc, stored)
    return {
        "task": data.task,
        "metric": data.metric,
        "load": {k: v for k, v in _load_kwargs(opts).items() if k != "csv_path"},  # load_demo_data's choices
        "data": {
            "source": str(Path(data.source).resolve()),
            "label": data.label,
            "features": data.features,
            "site_column": data.site_column,
            "ranges_from_data": data.ranges_from_data,
        },
        "sites": site_docs,
        "metric_central": central_pooled,
        "metric_central_note": "central model (pooled training rows, no DP) on the pooled held-out rows",
        "metric_federated_pooled": fed_pooled,
        "metric_federated_pooled_note": "the last global model on the pooled held-out rows",
        "label_std_pooled": float(np.std(y_pool)) if data.task == "regression" else None,
        "updates": {
            "applied": totals["applied"],
            "stale_dropped": totals["stale"],
            "rejected": totals["rejected"],
            "buffered_pending": totals["buffered"],
        },
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
        "secure_aggregation": secure_aggregation.report_block(
            ws.aggregator_toml.parent / "state" / "aggregator.sqlite",
            secure_aggregation.enabled(t.secure_aggregation, len(data.sites)),
            min(secure_aggregation.MIN_SITES, len(data.sites)),
        ),
    }


def _served(data: DemoData, ws: Workspace) -> dict[str, dict[str, Any]]:
    """What each line serves: the ONNX its site's model directory points at, scored on that site's test rows."""
    from edge.inference.model_dir import read_model, read_pointer
    from fedline.demo.baselines import predict_onnx
    from models.metrics import score

    out: dict[str, dict[str, Any]] = {}
    for s in data.sites:
        d = ws.site_dir(s.site) / "models"
        try:
            ptr = read_pointer(d)
            blob = read_model(d, ptr) if ptr else None
        except Exception as exc:  # reported as missing; the report says which site
            log.warning("site %s: no served model readable in %s: %s", s.site, d, exc)
            continue
        if not blob or ptr is None:
            continue
        pred = predict_onnx(blob, data.normalise(s.x_test))
        choice = ptr.meta.get("served") if isinstance(ptr.meta.get("served"), dict) else None
        out[s.site] = {
            "metric": score(data.metric, s.y_test, pred if data.task == "classification" else data.untarget(pred)),
            "kind": choice.get("kind") if choice else "global",
            "choice": choice,
            "version": ptr.version,
        }
    return out


def stored_rows(state_dir: Path) -> tuple[int, int] | None:
    """The training and validation rows a site's agent held in its dataset (``edge/site_state.py``'s
    ``dataset.sqlite`` under its data directory), read-only after the run; None when there is none to read.

    Why the report reads it: the PLC serves its live rows on its own clock from its start, so rows it served
    before the agent first polled it never reach the agent, and the report must not say every row did."""
    import sqlite3

    path = state_dir / "dataset.sqlite"
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            counts = dict(db.execute("SELECT holdout, COUNT(*) FROM examples GROUP BY holdout").fetchall())
        finally:
            db.close()
    except sqlite3.Error as exc:
        log.warning("no row counts readable in %s: %s", path, exc)
        return None
    return int(counts.get(0, 0)), int(counts.get(1, 0))


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as fh:
            return sum(1 for _ in fh)
    except OSError:
        return 0
