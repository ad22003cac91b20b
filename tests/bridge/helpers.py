"""Shared pieces of the wire tests: a federation's keys, updates, and a receive loop.

The receive loop is the aggregator's front door in miniature (reassemble, open,
verify, check the counter) so the broker tests exercise the same path the
aggregator will, and count every rejection by the stage and reason it failed.
"""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from nacl.public import PublicKey, SealedBox

from broker_bridge import envelope
from broker_bridge.chunking import Reassembler, split
from broker_bridge.client import MqttClient
from broker_bridge.errors import WireError
from broker_bridge.keys import Enrollment, KeyPair
from broker_bridge.topics import Topics

FEDERATION = "test"


@dataclass
class Federation:
    """Keys of the aggregator and of sites a, b, c; the enrollment lists a and b only
    (site-c has a broker login but was never enrolled, or was revoked)."""

    aggregator: KeyPair
    sites: dict[str, KeyPair]
    enrollment: Enrollment

    @property
    def agg_box_pub(self) -> bytes:
        return bytes(self.aggregator.box_key.public_key)

    @property
    def agg_sign_pub(self) -> bytes:
        return bytes(self.aggregator.signing_key.verify_key)


def make_federation(enrolled: tuple[str, ...] = ("site-a", "site-b")) -> Federation:
    agg = KeyPair.generate("aggregator", "aggregator")
    sites = {s: KeyPair.generate("site", s) for s in ("site-a", "site-b", "site-c")}
    enr = Enrollment(FEDERATION, agg.public())
    for s in enrolled:
        enr.add(sites[s].public())
    return Federation(agg, sites, enr)


def tensors_of(n_params: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A delta shaped like a small model: a matrix, a bias, and an int counter tensor."""
    rng = np.random.default_rng(seed)
    rows = max(1, n_params // 64)
    return {
        "layer.weight": rng.standard_normal((rows, 64), dtype=np.float32),
        "layer.bias": rng.standard_normal(7).astype(np.float64),
        "steps": np.arange(3, dtype=np.int64),
    }


def header(site: str, counter: int, msg_id: str | None = None) -> envelope.UpdateHeader:
    return envelope.UpdateHeader(
        site=site,
        counter=counter,
        msg_id=msg_id or f"{site}-u{counter}",
        base_version=3,
        n_samples=128,
        privacy={"clip_norm": 1.0, "noise_multiplier": 1.1, "epsilon": 0.5},
    )


def seal(
    fed: Federation, site: str, counter: int, n_params: int = 1000, seed: int = 0
) -> tuple[envelope.UpdateHeader, dict[str, np.ndarray], bytes]:
    h = header(site, counter)
    t = tensors_of(n_params, seed)
    return h, t, envelope.seal_update(h, t, fed.sites[site], fed.agg_box_pub)


# --------------------------------------------------------------------------- forgeries
def seal_inner(fed: Federation, inner: bytes) -> bytes:
    """Seal arbitrary inner bytes to the aggregator: a well-encrypted message whose
    content is whatever an attacker chose."""
    return b"FLE" + bytes([envelope.FORMAT_VERSION]) + SealedBox(PublicKey(fed.agg_box_pub)).encrypt(inner)


def signed_inner(signer: KeyPair, claimed_site: str, plain: bytes, *, forge: bool = False) -> bytes:
    """``FLS1 | site | verify key | signature | plaintext`` as seal_update builds it;
    with ``forge`` the signature is over other bytes (a forged signature)."""
    site = claimed_site.encode()
    signed = site + b"\x00" + (plain + b"x" if forge else plain)
    sig = signer.signing_key.sign(envelope.digest(signed, envelope._UPDATE_DOMAIN)).signature
    return b"FLS1" + bytes([len(site)]) + site + bytes(signer.signing_key.verify_key) + sig + plain


def forged_signature(fed: Federation, site: str, counter: int) -> bytes:
    plain = envelope.encode_update(header(site, counter), tensors_of(100))
    return seal_inner(fed, signed_inner(fed.sites[site], site, plain, forge=True))


def missing_signature(fed: Federation, site: str, counter: int) -> bytes:
    """The plaintext sealed to the aggregator with no signature block at all."""
    return seal_inner(fed, envelope.encode_update(header(site, counter), tensors_of(100)))


def impostor(fed: Federation, signer: str, claimed: str, counter: int) -> bytes:
    """Signed correctly by ``signer``'s key but claiming to come from ``claimed``."""
    plain = envelope.encode_update(header(claimed, counter), tensors_of(100))
    return seal_inner(fed, signed_inner(fed.sites[signer], claimed, plain))


def bad_schema(fed: Federation, site: str, counter: int) -> bytes:
    """Properly signed and sealed, but the header lacks n_samples."""
    doc = header(site, counter).to_dict()
    del doc["n_samples"]
    head = envelope.canonical_json(doc)
    plain = (
        b"FLU"
        + bytes([envelope.FORMAT_VERSION])
        + struct.pack("<I", len(head))
        + head
        + envelope.encode_tensors(tensors_of(100))
    )
    return seal_inner(fed, signed_inner(fed.sites[site], site, plain))


def tampered(blob: bytes, at: int = -20) -> bytes:
    b = bytearray(blob)
    b[at] ^= 0x01
    return bytes(b)


def wrong_version(blob: bytes) -> bytes:
    return blob[:3] + bytes([envelope.FORMAT_VERSION + 1]) + blob[4:]


# --------------------------------------------------------------------------- the wire
def chunk_items(
    topics: Topics, site: str, msg_id: str, blob: bytes, max_chunk: int = 100 * 1024
) -> list[tuple[str, bytes]]:
    return [(topics.update_chunk(site, msg_id, i), c) for i, c in enumerate(split(blob, msg_id, max_chunk))]


@dataclass
class Receiver:
    """Reassemble → open_update → counter check; count every rejection and keep going."""

    fed: Federation
    reassembler: Reassembler = field(default_factory=lambda: Reassembler(timeout_s=60))
    accepted: list[tuple[envelope.UpdateHeader, dict[str, np.ndarray], bytes]] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)  # (stage, reason) -> count
    seen: set[tuple[str, int]] = field(default_factory=set)  # (site, counter) already accepted

    def _is_new(self, site: str, counter: int) -> bool:
        return (site, counter) not in self.seen

    def feed(self, payload: bytes) -> None:
        try:
            done = self.reassembler.add(payload)
        except WireError as exc:
            self.rejected[("chunk", exc.reason)] += 1
            return
        if done is None:
            return
        _, blob = done
        try:
            h, t = envelope.open_update(blob, self.fed.aggregator, self.fed.enrollment, self._is_new)
        except WireError as exc:
            self.rejected[("open", exc.reason)] += 1
            return
        self.seen.add((h.site, h.counter))
        self.accepted.append((h, t, blob))

    async def run(self, client: MqttClient) -> None:
        async for msg in client.messages():
            self.feed(msg.payload)

    def start(self, client: MqttClient) -> asyncio.Task[None]:
        return asyncio.create_task(self.run(client))


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
