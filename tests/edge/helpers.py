"""Test rig for the edge agent: keys, a site.toml, a synthetic CSV, and a minimal aggregator.

The minimal aggregator is real on the wire: it logs in to the real Mosquitto as
``aggregator``, reassembles chunks with ``broker_bridge.chunking``, opens the
sealed updates with its private key, signs receipts and manifests. It records
every opened update (before any deduplication) so tests can count arrivals.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from broker_bridge.chunking import Reassembler, parse_chunk, split
from broker_bridge.client import MqttClient
from broker_bridge.envelope import UpdateHeader, content_hash, encode_tensors, open_update, seal_receipt, sign_manifest
from broker_bridge.keys import Enrollment, KeyPair, create_federation
from broker_bridge.topics import Topics
from models import ModelSpec

FEDERATION = "test"
FEATURES = ["temp", "torque", "speed"]


def write_csv(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` rows of three plant-like features and a label that depends on them."""
    rng = np.random.default_rng(seed)
    temp = rng.uniform(295, 305, n)
    torque = rng.uniform(10, 70, n)
    speed = rng.uniform(1200, 2800, n)
    label = ((torque - 40) / 30 + (temp - 300) / 5 + rng.normal(0, 0.3, n) > 0.5).astype(int)
    lines = ["temp,torque,speed,label"] + [
        f"{a:.2f},{b:.2f},{c:.1f},{d}" for a, b, c, d in zip(temp, torque, speed, label)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Federation:
    """Keys of one aggregator and some sites, saved under ``root/keys``."""

    root: Path
    aggregator: KeyPair
    sites: dict[str, KeyPair]
    enrollment_path: Path

    @classmethod
    def create(cls, root: Path, sites: list[str]) -> Federation:
        fed = create_federation(FEDERATION, sites, root / "keys")
        return cls(root, fed.aggregator, fed.sites, root / "keys" / "enrollment.json")

    @property
    def enrollment(self) -> Enrollment:
        return Enrollment.load(self.enrollment_path)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f'"{k}" = {toml_value(x)}' for k, x in v.items()) + " }"
    raise TypeError(v)


def write_aggregator(
    fed: Federation,
    broker: Any,
    path: Path,
    hidden: list[int] | None = None,
    client_id: str = "agg-real",
    strategy: str = 'kind = "fedasync"\nmin_sites = 1',
    extra: str = "[dp]\nlr = 0.1\nbatch_size = 32",
    *,
    url: str | None = None,
    password_file: Path | None = None,
    broker_extra: str = "",
    aggregator_extra: str = "",
) -> Path:
    """The real aggregator's config for ``fed`` on ``broker`` (a ``MosquittoProcess``): FedAsync by default.

    ``strategy`` is the body of ``[strategy]``; ``extra`` the tables after it (by default the sites' ``[dp]``).
    Another broker (a RabbitMQ cluster) is named by ``url`` and ``password_file`` with ``broker=None``;
    ``broker_extra`` and ``aggregator_extra`` are more lines of ``[broker]`` and ``[aggregator]``.
    """
    url = url or broker.url
    password_file = password_file or broker.paths["password:aggregator"]
    path.write_text(f"""
[aggregator]
federation = "{FEDERATION}"
key_file = "{fed.root / "keys" / "aggregator.key"}"
enrollment_file = "{fed.enrollment_path}"
state_dir = "{fed.root / "agg-state"}"
seed = 0
{aggregator_extra}

[model]
kind = "mlp"
n_features = 3
hidden = {hidden or [8]}
personal = ["head."]

[broker]
url = "{url}"
username = "aggregator"
password_file = "{password_file}"
client_id = "{client_id}"
backoff_min_s = 0.05
backoff_max_s = 0.5
{broker_extra}

[strategy]
{strategy}

{extra}
""")
    return path


def write_site(
    fed: Federation,
    site: str,
    csv: Path,
    broker_url: str,
    password_file: Path | None,
    *,
    privacy: dict[str, Any] | str | None = None,
    training: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    outbox: dict[str, Any] | None = None,
    broker: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    rows: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    recovery: dict[str, Any] | None = None,
) -> Path:
    """A site.toml under ``root/<site>/`` with paths relative to it."""
    d = fed.root / site
    d.mkdir(parents=True, exist_ok=True)
    tables: dict[str, dict[str, Any]] = {
        "keys": {"private": str(fed.root / "keys" / f"{site}.key"), "enrollment": str(fed.enrollment_path)},
        "broker": {
            "url": broker_url,
            "username": site,
            "client_id": site,
            "backoff_min_s": 0.05,
            "backoff_max_s": 0.5,
            "timeout_s": 5.0,
            **({"password_file": str(password_file)} if password_file else {}),
            **(broker or {}),
        },
        "rows": {
            "task": "classification",
            "label": "label",
            "features": [
                {"tag": "temp", "range": [295.0, 305.0]},
                {"tag": "torque", "range": [0.0, 80.0]},
                {"tag": "speed", "range": [1100.0, 2900.0]},
            ],
            **(rows or {}),
        },  # None: leave out
        "model": {"kind": "mlp", "n_features": 3, "hidden": [8], "personal": ["head."], **(model or {})},
        # max_pending_per_base: these agents mostly train without an aggregator; the tests of the default (1)
        # set it themselves
        "training": {
            "every_rows": 100000,
            "every_s": 3600.0,
            "min_rows": 50,
            "epochs": 1,
            "batch_size": 32,
            "lr": 0.1,
            "max_pending_per_base": 1000,
            **(training or {}),
        },
        "outbox": {**(outbox or {})},
        "metrics": {},
        # most of these agents run without an aggregator to answer a lost-data-dir request (tests of it turn it on)
        "recovery": {"ask_aggregator": False, **(recovery or {})},
    }
    tables["rows"] = {k: v for k, v in tables["rows"].items() if v is not None}
    if isinstance(privacy, dict) or privacy is None:
        tables["privacy"] = {"epsilon": 50.0, "delta": 1e-5, "noise_multiplier": 1.0, **(privacy or {})}
    lines = [
        f'site = "{site}"',
        f'federation = "{FEDERATION}"',
        'data_dir = "state"',
        'model_dir = "models"',
        "status_interval_s = 1.0",
    ]
    if isinstance(privacy, str):
        lines.append(f"privacy = {toml_value(privacy)}")
    for k, v in (extra or {}).items():
        lines.append(f"{k} = {toml_value(v)}")
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    src = {"kind": "csv", "name": "replay", "path": str(csv), **(source or {})}
    lines.append("[[sources]]")
    lines += [f"{k} = {toml_value(v)}" for k, v in src.items()]
    path = d / "site.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def model_release(
    version: int,
    spec: ModelSpec,
    shared: dict[str, np.ndarray],
    key: bytes,
    signer: KeyPair,
    *,
    epoch: int = 1,
    federation: str = FEDERATION,
    max_chunk: int = 2048,
) -> tuple[bytes, list[bytes]]:
    """A version as the aggregator publishes it: the sealed, signed manifest and the sealed weight chunks."""
    from broker_bridge.envelope import seal_for_federation
    from broker_bridge.federation_key import seal_manifest

    blob = encode_tensors(shared)
    chunks = split(seal_for_federation(blob, key), f"w{version}", max_chunk)
    manifest = {
        "federation": federation,
        "version": version,
        "epoch": epoch,
        "created_at": 0.0,
        "spec": spec.to_dict(),
        "weights": {"hash": content_hash(blob), "size": len(blob), "chunks": len(chunks)},
        "onnx": {"hash": "", "size": 0, "chunks": 0},
    }
    return seal_manifest(sign_manifest(manifest, signer), version, epoch, key), chunks


@dataclass
class Arrival:
    header: UpdateHeader
    tensors: dict[str, np.ndarray]


@dataclass
class MiniAggregator:
    """Opens updates and answers with signed receipts; publishes signed models on request."""

    fed: Federation
    settings: Any
    receipts: bool = True
    verdict: str = "applied"
    arrivals: list[Arrival] = field(default_factory=list)
    version: int = 0
    raw_chunks: Counter = field(default_factory=Counter)  # (msg_id, index) -> times received

    def __post_init__(self) -> None:
        self.topics = Topics(FEDERATION)
        self.client = MqttClient(self.settings)
        self.reassembler = Reassembler(timeout_s=60)
        self._task: asyncio.Task | None = None
        from broker_bridge.federation_key import new_content_key

        self.content_key = new_content_key()

    async def __aenter__(self) -> MiniAggregator:
        await self.client.__aenter__()
        await self.client.subscribe(self.topics.updates_filter(), qos=1)
        await self.client.wait_connected(10)
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.close()

    async def _loop(self) -> None:
        enrollment = self.fed.enrollment
        async for msg in self.client.messages():
            c = parse_chunk(msg.payload)
            self.raw_chunks[(c.msg_id, c.index)] += 1
            done = self.reassembler.add(msg.payload)
            if done is None:
                continue
            header, tensors = open_update(done[1], self.fed.aggregator, enrollment)
            self.arrivals.append(Arrival(header, {k: np.array(v) for k, v in tensors.items()}))
            if self.receipts:
                doc = {
                    "site": header.site,
                    "counter": header.counter,
                    "msg_id": header.msg_id,
                    "verdict": self.verdict,
                    "reason": None if self.verdict == "applied" else "test verdict",
                    "version": self.version,
                }
                box = enrollment.sites[header.site].box_pub
                await self.client.publish(
                    self.topics.receipts(header.site), seal_receipt(doc, self.fed.aggregator, box)
                )

    def counters(self, site: str) -> list[int]:
        return [a.header.counter for a in self.arrivals if a.header.site == site]

    async def publish_model(
        self,
        version: int,
        spec: ModelSpec,
        shared: dict[str, np.ndarray],
        max_chunk: int = 2048,
        keys: KeyPair | None = None,
        tamper: bool = False,
    ) -> None:
        """A signed manifest plus retained fedline chunks of the weights, sealed to the members as the
        aggregator does (the key grant of each enrolled site first)."""
        from broker_bridge.federation_key import seal_grant

        epoch, key = 1, self.content_key
        for pub in self.fed.enrollment.sites.values():
            await self.client.publish(
                self.topics.fedkey(pub.ident), seal_grant(FEDERATION, pub, epoch, key, self.fed.aggregator), retain=True
            )
        manifest, chunks = model_release(version, spec, shared, key, keys or self.fed.aggregator, max_chunk=max_chunk)
        if tamper:
            last = bytearray(chunks[-1])
            last[-1] ^= 1
            chunks[-1] = bytes(last)
        for i, c in enumerate(chunks):
            await self.client.publish(self.topics.weights_chunk(version, i), c, retain=True)
        await self.client.publish(self.topics.manifest(), manifest, retain=True)
        self.version = version
