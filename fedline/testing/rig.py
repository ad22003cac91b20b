"""A whole federation on disk and as real processes: Mosquitto, ``fedline aggregator``, ``fedline edge`` per site.

Why one rig for every fault: each scenario is "run the real thing, break one
part, let it recover, reconcile the ledgers", and only the breaking differs.
Every site reaches the broker through its own :class:`~fedline.netproxy.TcpProxy`; the
aggregator connects directly. Each site replays a synthetic plant CSV at a
fixed rate and trains on every ``every_rows`` new rows, so the number of
updates a run seals is known in advance and the run ends by itself (the
replay ends, training stops, the outboxes drain).

Layout under ``root``::

    keys/        aggregator.key, <site>.key, enrollment.json
    broker/      mosquitto.conf, acl, passwd, credentials/, data/ (persistence), mosquitto.log
    aggregator/  aggregator.toml, state/aggregator.sqlite
    sites/<site>/site.toml, rows.csv, state/outbox.sqlite (the site's ledger), models/
    logs/        <process>.log (JSON lines)
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from broker_bridge.binhead import read_status
from broker_bridge.keys import create_federation
from broker_bridge.mosquitto import MosquittoProcess
from fedline.launch import Launched, Launcher
from fedline.netproxy import TcpProxy
from fedline.testing.ledger import LedgerReport, read_site_ledger, reconcile
from fedline.testing.patience import bound

FEATURES = [("temp", (295.0, 305.0)), ("torque", (0.0, 80.0)), ("speed", (1100.0, 2900.0))]
MODEL = {"kind": "mlp", "n_features": 3, "hidden": [8], "task": "classification", "personal": []}


def write_plant_csv(path: Path, n: int, seed: int) -> Path:
    """``n`` rows of three plant-like features and a label that depends on them."""
    rng = np.random.default_rng(seed)
    temp = rng.uniform(295, 305, n)
    torque = rng.uniform(10, 70, n)
    speed = rng.uniform(1200, 2800, n)
    label = ((torque - 40) / 30 + (temp - 300) / 5 + rng.normal(0, 0.3, n) > 0.5).astype(int)
    lines = ["temp,torque,speed,label"] + [
        f"{a:.2f},{b:.2f},{c:.1f},{d}" for a, b, c, d in zip(temp, torque, speed, label)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class RigSettings:
    """The knobs a scenario turns (defaults: a short, steady run)."""

    federation: str = "faults"
    rows_per_site: int = 240
    rate_hz: float = 60.0  # rows per second each site's replay produces
    every_rows: int = 40  # one update per this many new rows
    buffer_size: int = 3  # FedBuff K
    max_staleness: int = 3
    resend_after_s: float = 8.0  # sent, no receipt for this long: send again
    site_keepalive_s: int = 3  # how soon a site notices a black-holed link
    outbox: dict[str, Any] = field(default_factory=dict)  # extra [outbox] keys (max_bytes, policy, ...)
    training: dict[str, Any] = field(default_factory=dict)
    strategy: dict[str, Any] = field(default_factory=dict)
    site_outbox: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-site [outbox] keys
    site_training: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-site [training] keys
    # [recovery] keys (edge.recovery). Off unless a test is about it: a first start otherwise waits for the
    # aggregator's answer, and under load the rows a scenario relies on are all in before its first round
    recovery: dict[str, Any] = field(default_factory=lambda: {"ask_aggregator": False})


class FaultRig:
    """Use as ``async with FaultRig(root, sites) as rig:``; the broker and proxies start on entry."""

    def __init__(self, root: Path, sites: list[str], settings: RigSettings | None = None) -> None:
        self.root = Path(root)
        self.sites = list(sites)
        self.s = settings or RigSettings()
        self.launcher = Launcher(self.root / "logs")
        self.broker = MosquittoProcess(self.root / "broker", federation=self.s.federation, sites=self.sites)
        self.proxies: dict[str, TcpProxy] = {}
        self.procs: dict[str, Launched] = {}
        self._quiet_since: tuple[int, float] | None = None
        self._write_keys()

    # -- files ------------------------------------------------------------------
    def _write_keys(self) -> None:
        create_federation(self.s.federation, self.sites, self.root / "keys")

    def site_dir(self, site: str) -> Path:
        return self.root / "sites" / site

    def outbox_db(self, site: str) -> Path:
        return self.site_dir(site) / "state" / "outbox.sqlite"

    @property
    def aggregator_db(self) -> Path:
        return self.root / "aggregator" / "state" / "aggregator.sqlite"

    def write_aggregator(self) -> Path:
        s = self.s
        doc = {
            "aggregator": {
                "federation": s.federation,
                "key_file": str(self.root / "keys" / "aggregator.key"),
                "enrollment_file": str(self.root / "keys" / "enrollment.json"),
                "state_dir": "state",
                "seed": 0,
                "workers": 1,
            },
            "model": MODEL,
            "broker": {
                "url": self.broker.url,
                "username": "aggregator",
                "password_file": str(self.broker.paths["password:aggregator"]),
                "client_id": "aggregator",
                "backoff_min_s": 0.1,
                "backoff_max_s": 1.0,
                "timeout_s": 10.0,
            },
            # min_sites 1: these federations have one or two sites (the rule has its own tests)
            "strategy": {
                "kind": "fedbuff",
                "buffer_size": s.buffer_size,
                "staleness": "polynomial",
                "max_staleness": s.max_staleness,
                "min_sites": 1,
                **s.strategy,
            },
            # the sites' DP-SGD settings (write_site): they bound an honest delta (aggregator.normbound)
            "dp": {
                "clip_norm": 1.0,
                "noise_multiplier": 1.0,
                "lr": 0.1,
                "batch_size": 32,
                "steps": 7 * int(s.training.get("epochs", 1)),
            },
            "publish": {"retain_versions": 3, "onnx": False},
        }
        return _write_toml(self.root / "aggregator" / "aggregator.toml", doc)

    def write_site(self, site: str, seed: int) -> Path:
        s = self.s
        d = self.site_dir(site)
        write_plant_csv(d / "rows.csv", s.rows_per_site, seed)
        doc = {
            "site": site,
            "federation": s.federation,
            "data_dir": "state",
            "model_dir": "models",
            "status_interval_s": 5.0,
            "model_seed": 0,
            "keys": {
                "private": str(self.root / "keys" / f"{site}.key"),
                "enrollment": str(self.root / "keys" / "enrollment.json"),
            },
            "broker": {
                "url": self.proxies[site].url,
                "username": site,
                "password_file": str(self.broker.paths[f"password:{site}"]),
                "client_id": f"edge-{site}",
                "backoff_min_s": 0.1,
                "backoff_max_s": 1.0,
                "timeout_s": 5.0,
                "keepalive_s": s.site_keepalive_s,
            },
            "sources": [{"kind": "csv", "name": "replay", "path": "rows.csv", "rate_hz": s.rate_hz}],
            "rows": {
                "task": "classification",
                "label": "label",
                "features": [{"tag": t, "range": list(r)} for t, r in FEATURES],
            },
            "model": MODEL,
            "dataset": {"holdout_fraction": 0.0},
            "training": {
                "every_rows": s.every_rows,
                "every_s": 3600.0,
                "min_rows": 20,
                "epochs": 1,
                "batch_size": 32,
                "lr": 0.1,
                "max_train_rows": 200,
                "threads": 1,
                "max_pending_per_base": 10**6,
                **s.training,
                **s.site_training.get(site, {}),
            },  # the rig measures delivery, not the throttle (a test of the throttle sets it per site)
            "privacy": {"epsilon": 1000.0, "delta": 1e-5, "noise_multiplier": 1.0, "max_grad_norm": 1.0},
            "outbox": {"resend_after_s": s.resend_after_s, **s.outbox, **s.site_outbox.get(site, {})},
            "recovery": {**s.recovery},
        }
        return _write_toml(d / "site.toml", doc)

    # -- processes ------------------------------------------------------------------
    async def __aenter__(self) -> FaultRig:
        await asyncio.to_thread(self.broker.start)
        for site in self.sites:
            self.proxies[site] = await TcpProxy(self.broker.port, name=site).start()
        self.write_aggregator()
        for i, site in enumerate(self.sites):
            self.write_site(site, seed=i)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.launcher.stop_all)
        for p in self.proxies.values():
            await p.stop()
        await asyncio.to_thread(self.broker.stop)

    def start_aggregator(self, clock_offset_s: float = 0.0) -> Launched:
        p = self.launcher.start(
            "aggregator",
            ["aggregator", "--config", str(self.root / "aggregator" / "aggregator.toml")],
            clock_offset_s=clock_offset_s,
        )
        self.procs["aggregator"] = p
        return p

    def start_site(self, site: str, clock_offset_s: float = 0.0) -> Launched:
        p = self.launcher.start(
            f"edge-{site}", ["edge", "--config", str(self.site_dir(site) / "site.toml")], clock_offset_s=clock_offset_s
        )
        self.procs[site] = p
        return p

    def start_all(self) -> None:
        self.start_aggregator()
        for site in self.sites:
            self.start_site(site)

    def check_alive(self) -> None:
        """Fail loudly (with the log tail) when a process died that nobody killed."""
        for name, p in self.procs.items():
            if not p.alive():
                raise AssertionError(f"{name} exited with {p.popen.returncode}:\n{p.tail()}")

    # -- observing ------------------------------------------------------------------------
    def ledger(self, site: str) -> list[dict[str, Any]]:
        return read_site_ledger(self.outbox_db(site))

    def states(self) -> dict[str, int]:
        """How many updates of all sites are in each ledger state now."""
        out: dict[str, int] = {}
        for site in self.sites:
            for e in self.ledger(site):
                out[e["state"]] = out.get(e["state"], 0) + 1
        return out

    def sealed(self) -> int:
        return sum(len(self.ledger(site)) for site in self.sites)

    def decided(self) -> int:
        """Updates the aggregator has a verdict for (0 before its store exists)."""
        if not self.aggregator_db.exists():
            return 0
        import sqlite3

        try:
            with sqlite3.connect(f"file:{self.aggregator_db}?mode=ro", uri=True, timeout=5) as con:
                return int(con.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])
        except sqlite3.OperationalError:
            return 0

    def replay_ended(self) -> bool:
        """Every site's current process has read its whole CSV (``sources.ended`` logged since it started)."""
        return all(self._ended_since_start(site) for site in self.sites)

    def _ended_since_start(self, site: str) -> bool:
        p = self.procs.get(site)
        return p is not None and bool(p.since_start("sources.ended"))

    def version(self) -> int:
        """The aggregator's newest committed model version (-1 before its store exists)."""
        return max(self.versions_at(), default=-1)

    def versions_at(self) -> dict[int, float]:
        """Committed model versions and when each was made (the aggregator's clock)."""
        if not self.aggregator_db.exists():
            return {}
        import sqlite3

        try:
            with sqlite3.connect(f"file:{self.aggregator_db}?mode=ro", uri=True, timeout=5) as con:
                return dict(con.execute("SELECT version, created_at FROM checkpoints").fetchall())
        except sqlite3.OperationalError:
            return {}

    def buffer_depth(self) -> int:
        """Updates waiting in the aggregator's FedBuff buffer (on disk)."""
        if not self.aggregator_db.exists():
            return 0
        import sqlite3

        try:
            with sqlite3.connect(f"file:{self.aggregator_db}?mode=ro", uri=True, timeout=5) as con:
                return int(con.execute("SELECT COUNT(*) FROM buffer").fetchone()[0])
        except sqlite3.OperationalError:
            return 0

    def unsettled(self, site: str) -> int:
        """The site's sealed updates still waiting for a receipt."""
        return sum(1 for e in self.ledger(site) if e["state"] in ("queued", "sent"))

    def settled(self) -> bool:
        """The replay is over everywhere, and every sealed update has its receipt, stable for a moment."""
        if not self.replay_ended():
            return False
        states = self.states()
        if states.get("queued") or states.get("sent"):
            self._quiet_since = None
            return False
        n = sum(states.values())
        now = time.monotonic()
        if self._quiet_since is None or self._quiet_since[0] != n:
            self._quiet_since = (n, now)  # a last round may still be sealing: wait for a quiet moment
            return False
        return now - self._quiet_since[1] >= 2.0

    async def until(self, pred, timeout: float, what: str, poll: float = 0.25) -> float:
        """Wait for ``pred()``, checking that no process died; returns the seconds it took (the bound is
        ``timeout`` times the patience factor, fedline.testing.patience)."""
        timeout = bound(timeout)
        t0 = time.monotonic()
        while not pred():
            self.check_alive()
            if time.monotonic() - t0 > timeout:
                raise AssertionError(
                    f"{what}: not within {timeout} s; ledger states {self.states()}, "
                    f"aggregator verdicts {self.decided()}"
                )
            await asyncio.sleep(poll)
        return time.monotonic() - t0

    async def retained_status(self, site: str, timeout: float = 10.0) -> dict[str, Any]:
        """The site's retained status document on the broker, read as the ``observer`` user."""
        from broker_bridge.client import BrokerSettings, MqttClient
        from broker_bridge.topics import Topics

        settings = BrokerSettings(
            url=self.broker.url,
            client_id=f"observer-{site}-{time.monotonic_ns()}",
            username="observer",
            password_file=str(self.broker.paths["password:observer"]),
            clean_start=True,
            session_expiry_s=0,
            timeout_s=timeout,
        )
        async with MqttClient(settings) as client:
            await client.subscribe(Topics(self.s.federation).status(site), qos=1)

            async def first() -> dict[str, Any]:
                async for msg in client.messages():
                    if msg.payload and (doc := read_status(msg.payload)) is not None:  # JSON or binary (FLH1)
                        return doc
                raise AssertionError("no status message")

            return await asyncio.wait_for(first(), timeout)

    def reconcile(self) -> LedgerReport:
        return reconcile({s: self.outbox_db(s) for s in self.sites}, self.aggregator_db)

    def redeliveries(self) -> int:
        """Updates the aggregator saw again and answered from its store (``update.duplicate``)."""
        p = self.procs.get("aggregator")
        return len(p.events("update.duplicate")) if p else 0


def _write_toml(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(doc), encoding="utf-8")
    return path
