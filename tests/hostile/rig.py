"""A federation on disk for the attack scenarios: keys, enrollment, aggregator.toml, sealed updates.

Kept here (not shared with other suites) so the attack tests describe their
attacker fully: which keys it has, what it signs, what it claims.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aggregator.config import AggregatorConfig, load_config
from broker_bridge import envelope
from broker_bridge.envelope import UpdateHeader
from broker_bridge.keys import Enrollment, KeyPair

FEDERATION = "test"  # the name tests/conftest.py's mosquitto fixture generates ACLs for

SPEC = """[model]
kind = "mlp"
n_features = 4
hidden = [8]
"""


@dataclass
class Fed:
    root: Path
    agg: KeyPair
    sites: dict[str, KeyPair]  # enrolled
    outsiders: dict[str, KeyPair]  # have keys (and maybe a broker login), not enrolled
    counters: dict[str, itertools.count] = field(default_factory=dict)

    def config(self, strategy: str = "", validation: str = "", broker: str = "") -> AggregatorConfig:
        """``min_sites = 1`` unless ``strategy`` sets it: these attacks come from one or two sites."""
        if "min_sites" not in strategy:
            strategy = f"min_sites = 1\n{strategy}"
        path = self.root / "aggregator.toml"
        path.write_text(
            f'[aggregator]\nfederation = "{FEDERATION}"\nkey_file = "aggregator.key"\n'
            f'enrollment_file = "enrollment.json"\nstate_dir = "state"\nseed = 3\n\n{SPEC}\n'
            f"[strategy]\n{strategy}\n\n[validation]\n{validation}\n\n{broker}\n"
        )
        return load_config(path)

    def header(self, site: str, base_version: int, counter: int | None = None, n_samples: int = 50) -> UpdateHeader:
        if counter is None:
            counter = next(self.counters.setdefault(site, itertools.count(1)))
        return UpdateHeader(
            site=site,
            counter=counter,
            msg_id=uuid.uuid4().hex[:16],
            base_version=base_version,
            n_samples=n_samples,
            privacy={"epsilon": 1.0, "delta": 1e-5},
        )

    def seal(
        self,
        site: str,
        delta: dict[str, np.ndarray],
        base_version: int = 0,
        *,
        counter: int | None = None,
        signer: KeyPair | None = None,
        n_samples: int = 50,
    ) -> tuple[bytes, UpdateHeader]:
        """A sealed update from ``site``; with ``signer`` another key signs it while claiming ``site``."""
        h = self.header(site, base_version, counter, n_samples)
        key = signer or self.sites[site]
        if key.ident != site:  # seal_update refuses a mismatch, so a forger builds the envelope itself
            return forge(h, delta, key, self.agg), h
        return envelope.seal_update(h, delta, key, self.agg.public().box_pub), h


def forge(header: UpdateHeader, delta: dict[str, np.ndarray], signer: KeyPair, agg: KeyPair) -> bytes:
    """What seal_update does, but signed by ``signer`` while the header and envelope name ``header.site``."""
    from nacl.public import PublicKey, SealedBox

    plain = envelope.encode_update(header, delta)
    site = header.site.encode()
    sig = signer.signing_key.sign(envelope.digest(site + b"\x00" + plain, envelope._UPDATE_DOMAIN)).signature
    inner = b"FLS1" + bytes([len(site)]) + site + bytes(signer.signing_key.verify_key) + sig + plain
    return b"FLE" + bytes([envelope.FORMAT_VERSION]) + SealedBox(PublicKey(agg.public().box_pub)).encrypt(inner)


def make_fed(root: Path, sites: list[str], outsiders: tuple[str, ...] = ("site-c",)) -> Fed:
    root.mkdir(parents=True, exist_ok=True)
    agg = KeyPair.generate("aggregator", "aggregator")
    agg.save(root / "aggregator.key")
    enr = Enrollment(FEDERATION, agg.public())
    keys = {s: KeyPair.generate("site", s) for s in sites}
    for k in keys.values():
        enr.add(k.public())
    enr.save(root / "enrollment.json")
    return Fed(root, agg, keys, {s: KeyPair.generate("site", s) for s in outsiders})


def like(model: dict[str, np.ndarray], value: float) -> dict[str, np.ndarray]:
    return {k: np.full(v.shape, value, np.float32) for k, v in model.items()}


def copy(model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.array(v, copy=True) for k, v in model.items()}


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)
