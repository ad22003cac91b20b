"""Two plants x three lines over three real Mosquittos: the central broker and one per plant.

The central aggregator and each plant aggregator are real processes
(``fedline aggregator``, ``fedline plant``); the lines are real edge agents in
the test's event loop (their training is what the test paces). Each plant
reaches the central broker over TLS through its own :class:`TcpProxy`, the
plant-to-central link the test cuts. Layout under ``root``::

    keys/central/   aggregator.key, plant-<p>.key, enrollment.json
    keys/<p>/       aggregator.key, <line>.key, enrollment.json
    brokers/<name>/ mosquitto.conf, credentials/ ...
    central/        aggregator.toml, state/
    plants/<p>/     plant.toml, state/ (the plant's aggregator), upstream/outbox.sqlite (its ledger upward)
    lines/<line>/   site.toml, rows.csv, state/outbox.sqlite, models/
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from broker_bridge.envelope import decode_tensors
from broker_bridge.keys import Enrollment, KeyPair
from broker_bridge.mosquitto import MosquittoProcess, free_port
from fedline.testing.rig import FEATURES, write_plant_csv

CENTRAL = "central"
MODEL = {"kind": "mlp", "n_features": 3, "hidden": [8], "task": "classification", "personal": []}
DP = {"clip_norm": 1.0, "noise_multiplier": 1.0, "lr": 0.1, "batch_size": 32, "steps": 7}


def write_toml(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(doc), encoding="utf-8")
    return path


def federation_keys(kd: Path, federation: str, sites: list[str]) -> Path:
    """An aggregator key, one key per site, and the enrollment; returns the enrollment's path."""
    agg = KeyPair.generate("aggregator", "aggregator")
    agg.save(kd / "aggregator.key")
    enr = Enrollment(federation, agg.public())
    for s in sites:
        kp = KeyPair.generate("site", s)
        kp.save(kd / f"{s}.key")
        enr.add(kp.public())
    enr.save(kd / "enrollment.json")
    return kd / "enrollment.json"


def broker_table(broker: MosquittoProcess, user: str, url: str | None = None, **more: Any) -> dict[str, Any]:
    return {
        "url": url or broker.url,
        "username": user,
        "password_file": str(broker.paths[f"password:{user}"]),
        "client_id": user,
        "backoff_min_s": 0.1,
        "backoff_max_s": 0.5,
        "timeout_s": 5.0,
        "keepalive_s": 3,
        **more,
    }


def aggregator_tables(
    root: Path, federation: str, kd: Path, broker: dict[str, Any], k: int, secagg: bool = False
) -> dict[str, Any]:
    doc = {
        "aggregator": {
            "federation": federation,
            "key_file": str(kd / "aggregator.key"),
            "enrollment_file": str(kd / "enrollment.json"),
            "state_dir": str(root / "state"),
            "seed": 0,
            "workers": 1,
            "catchup_interval_s": 1.0,
        },
        "model": MODEL,
        "broker": broker,
        "strategy": {"kind": "fedbuff", "buffer_size": k, "min_sites": 1, "max_staleness": 10},
        "dp": DP,
        "publish": {"retain_versions": 3, "onnx": False},
    }
    if secagg:  # cohorts of the three lines: the plant reads only their sum
        doc["strategy"].update(secure_aggregation=True, min_sites=3)
        doc["secagg"] = {"gather_s": 1.0, "deadline_s": 120.0, "unmask_timeout_s": 60.0}
    return doc


def line_toml(
    d: Path, line: str, plant: str, kd: Path, broker: dict[str, Any], seed: int, secagg: bool = False
) -> Path:
    write_plant_csv(d / "rows.csv", 120, seed)
    return write_toml(
        d / "site.toml",
        {
            "site": line,
            "federation": plant,
            "secure_aggregation": secagg,
            "data_dir": "state",
            "model_dir": "models",
            "status_interval_s": 2.0,
            "model_seed": 0,
            "keys": {"private": str(kd / f"{line}.key"), "enrollment": str(kd / "enrollment.json")},
            "broker": broker,
            "sources": [{"kind": "csv", "name": "replay", "path": "rows.csv"}],
            "rows": {
                "task": "classification",
                "label": "label",
                "features": [{"tag": t, "range": list(r)} for t, r in FEATURES],
            },
            "model": MODEL,
            "dataset": {"holdout_fraction": 0.0},
            "training": {
                "every_rows": 10**6,
                "every_s": 3600.0,
                "min_rows": 20,
                "epochs": 1,
                "batch_size": 32,
                "lr": 0.1,
                "threads": 1,
                "max_pending_per_base": 1000,
            },
            "privacy": {"epsilon": 1000.0, "delta": 1e-5, "noise_multiplier": 1.0, "max_grad_norm": 1.0},
            "outbox": {"resend_after_s": 5.0},
            # the test paces every round itself; a recovery answer (edge.recovery) would start one of its own
            "recovery": {"ask_aggregator": False},
        },
    )


def central_weights(state_dir: Path, version: int) -> dict[str, np.ndarray]:
    """A central version's weights, read from the aggregator's store without opening it for writing."""
    with sqlite3.connect(f"file:{state_dir / 'aggregator.sqlite'}?mode=ro", uri=True, timeout=5) as con:
        (name,) = con.execute("SELECT weights FROM checkpoints WHERE version = ?", (version,)).fetchone()
    return {k: np.array(v) for k, v in decode_tensors((state_dir / "blobs" / name).read_bytes()).items()}


def checkpoints(state_dir: Path) -> dict[int, dict[str, Any]]:
    """Every version's lineage in an aggregator's store (0 rows before it exists)."""
    db = state_dir / "aggregator.sqlite"
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return {v: json.loads(t) for v, t in con.execute("SELECT version, lineage FROM checkpoints")}
    except sqlite3.OperationalError:
        return {}


PLANTS = {"plant-a": ["a1", "a2", "a3"], "plant-b": ["b1", "b2", "b3"]}
QUANTISED_PLANTS = {"plant-b"}  # its upstream deltas are int8 ([upstream.update] quantise)
SECAGG_PLANTS = {"plant-a"}  # secure aggregation within this plant: it sees its lines' sum, never one line
LINES = {line: p for p, lines in PLANTS.items() for line in lines}


class PlantTier:
    """``async with PlantTier(root) as tier:`` three brokers, the central and plant processes, six line agents."""

    def __init__(
        self,
        root: Path,
        secagg_plants: set[str] = SECAGG_PLANTS,
        quantised_plants: set[str] = QUANTISED_PLANTS,
        plants: dict[str, list[str]] | None = None,
        central_secagg: bool = False,
    ) -> None:
        """``central_secagg``: the central aggregator runs cohorts of the plants (it needs three or more)."""
        self.secagg_plants, self.quantised_plants = set(secagg_plants), set(quantised_plants)
        self.plants = dict(plants or PLANTS)
        self.lines = {line: p for p, lines in self.plants.items() for line in lines}
        self.central_secagg = central_secagg
        from fedline.launch import Launcher

        self.root = Path(root)
        self.central_state = self.root / "central" / "state"
        self.launcher = Launcher(self.root / "logs")
        self.brokers: dict[str, MosquittoProcess] = {}
        self.proxies: dict[str, Any] = {}
        self.procs: dict[str, Any] = {}
        self.agents: dict[str, Any] = {}
        self.tasks: list[asyncio.Task] = []
        self.stop = asyncio.Event()
        self.rounds_done: dict[str, int] = {}  # rounds each line was asked for (tier.round)
        self.metrics_ports: dict[str, int] = {}  # each plant's /metrics

    def plant_state(self, p: str) -> Path:
        return self.root / "plants" / p / "state"

    def upstream_db(self, p: str) -> Path:
        return self.root / "plants" / p / "upstream" / "outbox.sqlite"

    async def __aenter__(self) -> PlantTier:
        from edge.agent import EdgeAgent
        from edge.config import load_edge_config
        from fedline.netproxy import TcpProxy

        root = self.root
        federation_keys(root / "keys" / CENTRAL, CENTRAL, list(self.plants))
        self.brokers[CENTRAL] = MosquittoProcess(
            root / "brokers" / CENTRAL, federation=CENTRAL, sites=list(self.plants)
        )
        for p, lines in self.plants.items():
            federation_keys(root / "keys" / p, p, lines)
            self.brokers[p] = MosquittoProcess(root / "brokers" / p, federation=p, sites=lines)
        for b in self.brokers.values():
            await asyncio.to_thread(b.start)
        central = self.brokers[CENTRAL]
        doc = aggregator_tables(
            root / "central",
            CENTRAL,
            root / "keys" / CENTRAL,
            broker_table(central, "aggregator"),
            len(self.plants) if self.central_secagg else 1,
            secagg=self.central_secagg,
        )
        write_toml(root / "central" / "aggregator.toml", doc)
        self.procs[CENTRAL] = self.launcher.start(
            CENTRAL, ["aggregator", "--config", str(root / "central" / "aggregator.toml")]
        )
        for p, lines in self.plants.items():
            self.proxies[p] = await TcpProxy(central.tls_port, name=p).start()
            doc = aggregator_tables(
                root / "plants" / p,
                p,
                root / "keys" / p,
                broker_table(self.brokers[p], "aggregator"),
                len(lines),
                secagg=p in self.secagg_plants,
            )
            self.metrics_ports[p] = free_port()
            doc["metrics"] = {"port": self.metrics_ports[p]}
            doc["upstream"] = {
                "site": p,
                "federation": CENTRAL,
                "key_file": str(root / "keys" / CENTRAL / f"{p}.key"),
                "enrollment_file": str(root / "keys" / CENTRAL / "enrollment.json"),
                "data_dir": str(root / "plants" / p / "upstream"),
                "status_interval_s": 1.0,
                "broker": broker_table(
                    central, p, f"mqtts://127.0.0.1:{self.proxies[p].port}", ca_file=central.ca_file
                ),
                "outbox": {"resend_after_s": 5.0},
                # plant-b's deltas cross the WAN as int8 (plant-a's as float32)
                "update": {"quantise": "int8" if p in self.quantised_plants else "off"},
                "secure_aggregation": self.central_secagg,
            }
            write_toml(root / "plants" / p / "plant.toml", doc)
            self.start_plant(p)
        for i, (line, p) in enumerate(self.lines.items()):
            path = line_toml(
                root / "lines" / line,
                line,
                p,
                root / "keys" / p,
                broker_table(self.brokers[p], line),
                i,
                secagg=p in self.secagg_plants,
            )
            self.agents[line] = EdgeAgent(load_edge_config(path))
            self.tasks.append(asyncio.create_task(self.agents[line].run(self.stop)))
        return self

    def kill_plant(self, p: str) -> None:
        """SIGKILL the plant's process (no clean-up runs); :meth:`start_plant` brings it back."""
        self.procs.pop(p).kill9()

    def start_plant(self, p: str) -> None:
        self.procs[p] = self.launcher.start(p, ["plant", "--config", str(self.root / "plants" / p / "plant.toml")])

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        _, slow = await asyncio.wait(self.tasks, timeout=30) if self.tasks else (set(), set())
        for t in slow:  # bounded: a slow stop must not hang the suite
            t.cancel()
        for a in self.agents.values():
            a.close()
        await asyncio.to_thread(self.launcher.stop_all)
        for px in self.proxies.values():
            await px.stop()
        for b in self.brokers.values():
            await asyncio.to_thread(b.stop)

    # -- observing -------------------------------------------------------------------------------
    def alive(self) -> None:
        for name, proc in self.procs.items():
            assert proc.alive(), f"{name} exited:\n{proc.tail()}"

    async def until(self, pred, timeout: float, what: str) -> None:
        """Wait for ``pred()`` while every process lives; fail naming ``what``."""
        from tests.conftest import eventually

        try:
            await eventually(lambda: self.alive() or pred(), timeout, 0.1)
        except AssertionError as exc:
            raise AssertionError(f"{what}: not within {timeout} s ({exc})") from None

    def plant_metrics(self, p: str) -> dict[str, float]:
        """The plant's /metrics, scraped over HTTP as Prometheus would (unlabelled samples and ``name{labels}``)."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_ports[p]}/metrics", timeout=5) as r:
            text = r.read().decode()
        return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln and ln[0] != "#"}

    def upstream(self, line: str) -> int | None:
        """The central version a line's model is, as its plant's signed manifest names it."""
        up = self.agents[line].base.manifest.get("upstream")
        return up["version"] if up else None

    def central_version(self) -> int:
        return max(checkpoints(self.central_state), default=-1)

    def follow(self, lines: list[str], version: int) -> bool:
        return all(self.upstream(line) == version for line in lines)

    def settled(self, lines: list[str]) -> bool:
        """Every update of these lines has its final receipt (applied)."""
        agents = self.agents
        return all(agents[x].outbox.depth()[0] == 0 for x in lines) and all(
            e.state == "applied" for x in lines for e in agents[x].outbox.ledger()
        )

    async def round(self, lines: list[str]) -> None:
        """One training round on each of ``lines`` (sealed and queued; sending is the agents' own).

        A line under secure aggregation trains for a cohort on the base it holds, and a cohort's
        announcement also wakes the agent's own loop while it has new rows (its first round): that round
        counts as the phase's. The test holds the agent's round lock while it checks, waits for the cohort
        and trains, so no round of the agent's own runs in between.
        """
        for line in lines:
            a = self.agents[line]
            self.rounds_done[line] = self.rounds_done.get(line, 0) + 1
            if a.cohorts is None:
                assert await a.train_once() is not None, line
                continue
            async with a.rounds._lock:
                if len(a.outbox.ledger()) >= self.rounds_done[line]:
                    continue  # its own loop trained for this phase's cohort
                await self.until(lambda a=a: a.cohorts.ready(a.base.version) is not None, 60, f"{line}: a cohort")
                assert await a.rounds._round() is not None, line

    def check_ledgers(self, line_updates: int, plant_deltas: int) -> None:
        """Both tiers reconcile: each line update applied once at its plant, each plant delta once centrally."""
        from fedline.testing.ledger import reconcile

        for p, lines in self.plants.items():
            rep = reconcile({x: self.agents[x].outbox.path for x in lines}, self.plant_state(p) / "aggregator.sqlite")
            assert rep.exact, (p, rep.problems())
            assert (rep.sealed, rep.applied, rep.buffered) == (line_updates, line_updates, 0), (p, rep.figures())
        rep = reconcile({p: self.upstream_db(p) for p in self.plants}, self.central_state / "aggregator.sqlite")
        assert rep.exact, rep.problems()
        versions = plant_deltas // len(self.plants) if self.central_secagg else plant_deltas  # a cohort: one version
        assert (rep.sealed, rep.applied, rep.versions) == (plant_deltas, plant_deltas, versions), rep.figures()
        central_sites = {u["site"] for lin in checkpoints(self.central_state).values() for u in lin["updates"]}
        assert central_sites == set(self.plants)  # the central aggregator never sees a line
