"""A five-site federation with real keys and real on-disk answer logs, and a scripted aggregator."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from broker_bridge.keys import Enrollment, KeyPair
from broker_bridge.secagg import messages as m
from broker_bridge.secagg.member import SecAggMember
from broker_bridge.secagg.unmask import CohortUnmasker

FEDERATION = "test"
SITES = ("site-a", "site-b", "site-c", "site-d", "site-e")


@dataclass
class Federation:
    aggregator: KeyPair
    keys: dict[str, KeyPair]
    enrollment: Enrollment
    log_dir: Path

    def member(self, site: str) -> SecAggMember:
        """A member backed by its on-disk log: calling this again is a restart."""
        return SecAggMember(self.keys[site], self.enrollment, self.log_dir / f"{site}.sqlite")


def make_federation(tmp_path: Path, sites: tuple[str, ...] = SITES) -> Federation:
    agg = KeyPair.generate("aggregator", "aggregator")
    keys = {s: KeyPair.generate("site", s) for s in sites}
    enr = Enrollment(FEDERATION, agg.public())
    for k in keys.values():
        enr.add(k.public())
    return Federation(agg, keys, enr, tmp_path / "logs")


def announcement(
    sites: tuple[str, ...] = SITES,
    *,
    threshold: int = 3,
    clip_range: float = 1.0,
    weights: dict[str, float] | None = None,
    deadline_in: float = 60.0,
    federation: str = FEDERATION,
    min_survivors: int = 3,
) -> m.CohortAnnouncement:
    now = time.time()
    return m.CohortAnnouncement(
        federation,
        secrets.token_hex(16),
        7,
        tuple(sorted(sites)),
        threshold,
        min_survivors,
        now + deadline_in,
        now,
        clip_range,
        weights or {s: 1.0 for s in sites},
    )


def deltas(sites: tuple[str, ...], n: int, seed: int = 0, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s: rng.normal(0.0, scale, n) for s in sites}


def run_to_answers(
    fed: Federation, members: dict[str, SecAggMember], unmasker: CohortUnmasker, answering: tuple[str, ...]
) -> None:
    """Close the cohort, collect acks and answers from ``answering`` (through their wire encodings)."""
    blob = unmasker.close()
    for s in answering:
        unmasker.add_ack(s, members[s].ack(blob))
    for s in answering:
        req = m.UnmaskRequest.decode(unmasker.request_for(s).encode())
        unmasker.add_answer(m.Answer.decode(members[s].answer(req).encode()), s)
