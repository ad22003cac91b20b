"""Helpers for the line-inference tests: configs, a steady row stream, an aggregator that publishes models."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker_bridge.chunking import split
from broker_bridge.envelope import content_hash, sign_manifest
from broker_bridge.keys import KeyPair
from broker_bridge.topics import Topics
from edge.inference.config import InferConfig, parse_infer_config
from fedline.testing.patience import bound
from firmware_adapters.rows import Row

N_FEATURES = 4
FEATURES = [{"tag": f"t{i}", "range": [0.0, 1.0]} for i in range(N_FEATURES)]
TRUE_W = np.array([3.0, -2.0, 1.5, -1.0])
TRUE_B = -0.5


def broker_table(settings: Any) -> dict[str, Any]:
    """A ``[broker]`` TOML table from BrokerSettings (what a user would write)."""
    return {k: v for k, v in dataclasses.asdict(settings).items() if v is not None}


def make_config(tmp_path: Path, line: dict[str, Any] | None = None, **top: Any) -> InferConfig:
    """An InferConfig as if read from ``tmp_path/line.toml``."""
    doc: dict[str, Any] = {
        "line": {
            "site": "site-a",
            "federation": "test",
            "state_dir": "state",
            "poll_s": 0.05,
            "model_source": "model_dir",
            "model_dir": "models",
            **(line or {}),
        },
        "rows": {"features": FEATURES, "label": "fail"},
        "output": {"file": "predictions.jsonl"},
    }
    doc.update(top)
    return parse_infer_config(doc, tmp_path / "line.toml")


class RowStream:
    """A steady, reproducible stream of rows; remembers every row it yielded, in order."""

    def __init__(
        self, seed: int = 0, per_tick: int = 10, tick_s: float = 0.002, labelled: bool = True, limit: int | None = None
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.per_tick = per_tick
        self.tick_s = tick_s
        self.labelled = labelled
        self.limit = limit
        self.xs: list[np.ndarray] = []
        self._stop = False

    def stop(self) -> None:
        self._stop = True

    async def __aiter__(self):
        while not self._stop and (self.limit is None or len(self.xs) < self.limit):
            for _ in range(self.per_tick):
                x = self.rng.uniform(0.0, 1.0, N_FEATURES).astype(np.float32)
                y = float(x @ TRUE_W + TRUE_B > 0) if self.labelled else None
                self.xs.append(x)
                yield Row(x=x, y=y, ts=time.time())
            await asyncio.sleep(self.tick_s)


class Aggregator:
    """Publishes global models the way the aggregator does: the member's key grant, retained sealed ONNX
    chunks, then a signed manifest sealed under the content key."""

    def __init__(self, client: Any, keys: KeyPair, member: KeyPair, federation: str = "test") -> None:
        from broker_bridge.federation_key import new_content_key

        self.client = client
        self.keys = keys
        self.member = member
        self.topics = Topics(federation)
        self.federation = federation
        self.epoch, self.content_key = 1, new_content_key()

    def manifest(self, version: int, blob: bytes, msg_id: str, **override: Any) -> dict[str, Any]:
        doc = {
            "federation": self.federation,
            "version": version,
            "created_at": time.time(),
            "spec": {"kind": "mlp", "n_features": N_FEATURES, "hidden": [1]},
            "weights": {"hash": "0" * 64, "size": 0, "chunks": 0, "msg_id": f"w{version}"},
            "onnx": {"hash": content_hash(blob), "size": len(blob), "chunks": 0, "msg_id": msg_id},
        }
        for k, v in override.items():
            doc[k] = v
        return doc

    async def publish(
        self,
        version: int,
        blob: bytes,
        *,
        chunk_blob: bytes | None = None,
        signer: KeyPair | None = None,
        max_chunk: int = 2048,
        **override: Any,
    ) -> None:
        """Publish ``blob`` as ``version``; ``chunk_blob`` sends other bytes than the manifest names."""
        from broker_bridge.envelope import seal_for_federation
        from broker_bridge.federation_key import seal_grant, seal_manifest

        await self.client.publish(
            self.topics.fedkey(self.member.ident),
            seal_grant(self.federation, self.member.public(), self.epoch, self.content_key, self.keys),
            retain=True,
        )
        msg_id = f"onnx-{version}-{secrets.token_hex(3)}"
        sealed = seal_for_federation(chunk_blob if chunk_blob is not None else blob, self.content_key)
        chunks = split(sealed, msg_id, max_chunk)
        doc = {"epoch": self.epoch, **self.manifest(version, blob, msg_id, **override)}
        doc["onnx"]["chunks"] = len(chunks)
        await self.client.publish_many(
            [(self.topics.onnx_chunk(version, i), c) for i, c in enumerate(chunks)], retain=True
        )
        signed = sign_manifest(doc, signer or self.keys)
        await self.client.publish(
            self.topics.manifest(), seal_manifest(signed, version, self.epoch, self.content_key), retain=True
        )


@pytest.fixture
def site_keys(tmp_path: Path) -> KeyPair:
    """Site ``site-a``'s key file (the line reads it to open the content key granted to its site)."""
    keys = KeyPair.generate("site", "site-a")
    keys.save(tmp_path / "site-a.key")
    return keys


@pytest.fixture
def aggregator_keys(tmp_path: Path) -> KeyPair:
    keys = KeyPair.generate("aggregator", "aggregator")
    keys.public().save(tmp_path / "aggregator.pub")
    return keys


@pytest.fixture
def plant_broker(tmp_path: Path):
    """A plain, anonymous Mosquitto standing in for the plant's own broker (predictions, commands)."""
    import getpass
    import socket
    import subprocess

    from broker_bridge.mosquitto import free_port, mosquitto_binary

    binary = mosquitto_binary()
    if binary is None:
        pytest.fail("this test needs the mosquitto broker: apt-get install mosquitto")
    port = free_port()
    conf = tmp_path / "plant-mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"user {getpass.getuser()}\nlog_dest file {tmp_path / 'plant-mosquitto.log'}\n"
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"plant mosquitto did not start; see {tmp_path / 'plant-mosquitto.log'}")
            time.sleep(0.05)
    yield f"mqtt://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(bound(10))
