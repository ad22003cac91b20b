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

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from broker_bridge.envelope import decode_tensors
from broker_bridge.keys import Enrollment, KeyPair
from broker_bridge.mosquitto import MosquittoProcess
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


def aggregator_tables(root: Path, federation: str, kd: Path, broker: dict[str, Any], k: int) -> dict[str, Any]:
    return {
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


def line_toml(d: Path, line: str, plant: str, kd: Path, broker: dict[str, Any], seed: int) -> Path:
    write_plant_csv(d / "rows.csv", 120, seed)
    return write_toml(
        d / "site.toml",
        {
            "site": line,
            "federation": plant,
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
