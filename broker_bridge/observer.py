"""The federation as one broker subscriber sees it: the one observer of the wire.

Why one: ``fedline status``, the demo's live table and report, and the tests that watch a
federation all read the same retained statuses, sealed manifests and sealed receipts. Each
kept its own view before, and the copies drifted (one counted a malformed status, the other
did not). :class:`Observer` is fed every message its subscriptions bring (``on_message``) and
keeps a :class:`FederationView`.

What it can read depends on the keys it is given, as for any party (docs/architecture.md,
"What each party can see"):

- **no keys** (the ``observer`` login, ``fedline status``): site statuses (liveness, version, ε,
  outbox depth), each sealed manifest's version and key epoch, service liveness, how many
  receipts each site got (sealed to the site: counted, not read) and update message ids
  (random: how many updates, not their counters);
- **a site's keys** (``site_keys``; the demo generated them all): that site's receipts, and, with
  the first site's grant, the manifests and the published ONNX of every version, which
  ``score(onnx) -> {site: metric}`` turns into the history the demo reports.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from broker_bridge.binhead import read_status
from broker_bridge.chunking import Reassembler
from broker_bridge.envelope import content_hash, open_for_federation, open_receipt
from broker_bridge.errors import FedlineError, WireError
from broker_bridge.federation_key import Keyring, open_manifest, sealed_manifest_header
from broker_bridge.keys import KeyPair
from broker_bridge.topics import Topics

log = logging.getLogger("fedline.observer")

FINAL_VERDICTS = ("applied", "stale", "rejected")


@dataclass
class SiteView:
    """One site as seen on the wire."""

    site: str
    status: dict[str, Any] = field(default_factory=dict)  # the last figures it published (a will keeps them)
    receipts: Counter[str] = field(default_factory=Counter)  # "sealed": receipts seen, readable or not
    verdicts: dict[int, dict[str, Any]] = field(default_factory=dict)  # counter -> receipt (with the site's key)
    staleness: list[int] = field(default_factory=list)
    update_bytes: int = 0  # payload + topic bytes of this site's update chunks seen on the wire
    update_chunks: int = 0
    update_ids: dict[str, float] = field(default_factory=dict)  # msg id -> first seen (random ids: no counters)
    max_outbox_depth: int = 0
    online_statuses: int = 0  # statuses saying "online" (not a will): the demo waits for one after a reconnect

    def count(self, verdict: str) -> int:
        return sum(1 for r in self.verdicts.values() if r.get("verdict") == verdict)

    @property
    def updates_sent(self) -> int:
        """Distinct updates seen on the wire (a resend has the same id)."""
        return len(self.update_ids)


@dataclass
class FederationView:
    """Live state of the federation as seen on the wire."""

    federation: str
    sites: dict[str, SiteView] = field(default_factory=dict)
    model: dict[str, int] | None = None  # the newest sealed manifest's clear header: {"version", "epoch"}
    services: dict[str, dict[str, Any]] = field(default_factory=dict)  # broker user -> liveness document
    history: list[dict[str, Any]] = field(default_factory=list)  # {version, t, metrics{site: value}}
    manifests: dict[int, dict[str, Any]] = field(default_factory=dict)  # opened (with a member's key)
    onnx: dict[int, bytes] = field(default_factory=dict)
    malformed: int = 0
    started: float = field(default_factory=time.time)

    @property
    def version(self) -> int:
        """The newest model version announced (0 before any)."""
        return self.model["version"] if self.model else 0

    def totals(self) -> dict[str, int]:
        out = {"applied": 0, "stale": 0, "rejected": 0, "buffered": 0}
        for s in self.sites.values():
            for k in out:
                out[k] += s.count(k)
        return out


class Observer:
    """Feed it every message (``on_message``); it keeps a :class:`FederationView`.

    ``sites``: the sites to show even before they are seen. With ``only_sites`` a message about
    any other site is ignored (the demo follows its own sites, not a revoked spare); otherwise a
    site is added when first seen.
    """

    def __init__(
        self,
        topics: Topics,
        sites: Iterable[str] = (),
        *,
        only_sites: bool = False,
        aggregator_sign_pub: bytes | None = None,
        site_keys: dict[str, KeyPair] | None = None,
        score: Callable[[bytes], dict[str, float]] | None = None,
    ) -> None:
        self.topics = topics
        self.sign_pub = aggregator_sign_pub
        self.site_keys = (site_keys or {}) if aggregator_sign_pub is not None else {}
        self.score = score
        self.view = FederationView(topics.federation, {s: SiteView(s) for s in sites})
        self.only_sites = only_sites
        # plays one member (the first site it has keys of) to read the models
        self.member = next((self.site_keys[s] for s in self.view.sites if s in self.site_keys), None)
        self.keyring = Keyring()
        self._sealed_manifests: list[bytes] = []  # not opened yet (no key of their epoch so far)
        self._model_chunks = Reassembler(timeout_s=120)
        self._blobs: dict[str, bytes] = {}  # msg_id -> blob (weights/onnx of recent versions)

    def subscriptions(self, updates: bool = False) -> list[str]:
        """The filters to subscribe to: what an outsider reads, plus the models when playing a member."""
        t = self.topics
        out = [t.status_filter(), t.manifest(), t.receipts_filter(), t.service_status_filter()]
        if self.member is not None:
            out += [t.fedkey(self.member.ident), t.model_filter()]
        return out + ([t.updates_filter()] if updates else [])

    def _site(self, name: str | None) -> SiteView | None:
        if name is None or (self.only_sites and name not in self.view.sites):
            return None
        return self.view.sites.setdefault(name, SiteView(name))

    def on_message(self, msg: Any) -> None:
        """One MQTT message (``topic``, ``payload``); a cleared retained message is nothing to read."""
        if not msg.payload:
            return
        try:
            info = self.topics.parse(msg.topic)
        except (FedlineError, ValueError):
            self.view.malformed += 1
            return
        if info.kind == "update":
            if (sv := self._site(info.site)) is not None:
                sv.update_bytes += len(msg.payload) + len(msg.topic)
                sv.update_chunks += 1
                sv.update_ids.setdefault(info.msg_id or "", time.time())
        elif info.kind == "status":
            if (sv := self._site(info.site)) is not None:
                self._on_status(sv, msg.payload)
        elif info.kind == "service_status" and info.site:
            try:
                doc = json.loads(msg.payload)
            except ValueError:
                doc = None
            if isinstance(doc, dict):
                self.view.services[info.site] = doc
            else:
                self.view.malformed += 1
        elif info.kind == "receipts":
            if (sv := self._site(info.site)) is not None:
                sv.receipts["sealed"] += 1
                if info.site in self.site_keys and self.sign_pub is not None:
                    self._on_receipt(sv, self.site_keys[info.site], msg.payload)
        elif info.kind in ("weights", "onnx") and self.member is not None:
            try:
                done = self._model_chunks.add(msg.payload)
            except FedlineError:
                self.view.malformed += 1
                return
            if done is not None:
                self._blobs[done[0]] = done[1]
                self._try_score()
        elif info.kind == "fedkey" and self.member is not None and info.site == self.member.ident:
            self._on_grant(msg.payload)
        elif info.kind == "manifest":
            try:
                epoch, version = sealed_manifest_header(msg.payload)  # what an outsider reads
            except FedlineError:
                self.view.malformed += 1
                return
            if version >= self.view.version:
                self.view.model = {"version": version, "epoch": epoch}
            self._open_manifest(msg.payload)
            self._try_score()

    def _on_status(self, sv: SiteView, payload: bytes) -> None:
        doc = read_status(payload)  # JSON or binary (FLH1)
        if doc is None:
            self.view.malformed += 1
            sv.status = {**sv.status, "state": payload.decode("utf-8", "replace")[:64]}
            return
        sv.status = {**sv.status, **doc}  # a last will says only 'offline': keep the last figures
        if doc.get("state") == "online":
            sv.online_statuses += 1
        depth = doc.get("outbox_depth")
        if isinstance(depth, int) and not isinstance(depth, bool):
            sv.max_outbox_depth = max(sv.max_outbox_depth, depth)

    def _on_receipt(self, sv: SiteView, keys: KeyPair, payload: bytes) -> None:
        assert self.sign_pub is not None
        try:
            doc = open_receipt(payload, keys, self.sign_pub)
        except FedlineError:
            self.view.malformed += 1
            return
        counter = int(doc.get("counter", -1))
        prev = sv.verdicts.get(counter)
        if prev is not None and prev.get("verdict") in FINAL_VERDICTS:
            return  # a resent update's receipt repeats its first verdict
        sv.verdicts[counter] = doc
        if doc.get("verdict") in ("applied", "stale") and doc.get("staleness") is not None:
            sv.staleness.append(int(doc["staleness"]))

    def _on_grant(self, payload: bytes) -> None:
        assert self.member is not None and self.sign_pub is not None
        try:
            self.keyring.add_grant(payload, self.member, self.sign_pub, self.topics.federation)
        except FedlineError:
            self.view.malformed += 1
            return
        pending, self._sealed_manifests = self._sealed_manifests, []
        for blob in pending:
            self._open_manifest(blob)
        self._try_score()

    def _open_manifest(self, blob: bytes) -> None:
        if self.member is None or self.sign_pub is None:
            return
        try:
            m, _ = open_manifest(blob, self.keyring, self.sign_pub)
        except WireError as exc:
            if exc.reason == "epoch":
                self._sealed_manifests.append(blob)
            else:
                self.view.malformed += 1
            return
        self.view.manifests[int(m["version"])] = m

    def _try_score(self) -> None:
        v = self.view
        for version, m in sorted(v.manifests.items()):
            if version in v.onnx:
                continue
            sealed = self._blobs.get(m["onnx"]["msg_id"])
            key = self.keyring.get(m["epoch"])
            if sealed is None or key is None:
                continue
            try:
                blob = open_for_federation(sealed, key)
            except WireError:
                continue
            if content_hash(blob) != m["onnx"]["hash"]:
                continue
            v.onnx[version] = blob
            metrics: dict[str, float] = {}
            if self.score is not None:
                try:
                    metrics = self.score(blob)
                except Exception:  # scoring is for the report; it must not stop the recording
                    log.exception("scoring version %s failed", version)
            v.history.append({"version": version, "t": round(time.time() - v.started, 2), "metrics": metrics})
        scored = {v.manifests[ver][part]["msg_id"] for ver in v.onnx for part in ("onnx", "weights")}
        for key in scored & set(self._blobs):
            del self._blobs[key]
