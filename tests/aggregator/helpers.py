"""Shared test scaffolding: a federation on disk (keys, enrollment, aggregator.toml) and sealed updates."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.config import AggregatorConfig, load_config
from broker_bridge import envelope
from broker_bridge.envelope import UpdateHeader
from broker_bridge.keys import Enrollment, KeyPair, create_federation

SPEC_TOML = """
[model]
kind = "mlp"
n_features = 4
hidden = [8]
personal = ["head."]
"""


@dataclass
class Federation:
    """Keys and files of one test federation."""

    root: Path
    federation: str
    agg: KeyPair
    sites: dict[str, KeyPair]
    counters: dict[str, itertools.count] = field(default_factory=dict)

    @property
    def enrollment(self) -> Enrollment:
        return Enrollment.load(self.root / "enrollment.json")

    def write_config(
        self,
        strategy: str = "",
        extra: str = "",
        broker: str = "",
        name: str = "aggregator.toml",
        state_dir: str = "state",
        spec: str = SPEC_TOML,
    ) -> Path:
        """The aggregator's file; ``min_sites = 1`` unless ``strategy`` sets it: these federations are tiny, and
        tests of the machinery (intake, durability, the wire) send from one or two sites. The fairness rules
        have tests of their own (tests/aggregator/test_fairness.py)."""
        if "min_sites" not in strategy:
            strategy = f"min_sites = 1\n{strategy}"
        path = self.root / name
        path.write_text(
            f"""[aggregator]
federation = "{self.federation}"
key_file = "aggregator.key"
enrollment_file = "enrollment.json"
state_dir = "{state_dir}"
seed = 7
{spec}
[strategy]
{strategy}
{extra}
{broker}
"""
        )
        return path

    def config(self, **kw: Any) -> AggregatorConfig:
        return load_config(self.write_config(**kw))

    def seal(
        self,
        site: str,
        delta: dict[str, np.ndarray],
        base_version: int,
        n_samples: int = 10,
        counter: int | None = None,
        msg_id: str | None = None,
        encoding: str = "float32",
    ) -> tuple[bytes, UpdateHeader]:
        """Seal ``delta`` as given (with ``encoding = "int8"`` pass the encoded block: broker_bridge.quantised)."""
        if counter is None:
            counter = next(self.counters.setdefault(site, itertools.count(1)))
        header = UpdateHeader(
            site=site,
            counter=counter,
            msg_id=msg_id or uuid.uuid4().hex[:16],
            base_version=base_version,
            n_samples=n_samples,
            privacy={"epsilon": 1.0, "delta": 1e-5},
            encoding=encoding,
        )
        return envelope.seal_update(header, delta, self.sites[site], self.agg.public().box_pub), header


def make_federation(root: Path, sites: list[str], federation: str = "test") -> Federation:
    fed = create_federation(federation, sites, root)
    return Federation(root, federation, fed.aggregator, fed.sites)


def random_delta(
    reference: dict[str, np.ndarray], rng: np.random.Generator, scale: float = 0.01
) -> dict[str, np.ndarray]:
    return {k: (rng.standard_normal(v.shape) * scale).astype(np.float32) for k, v in reference.items()}
