"""What the demo knows about the federation, read only from the broker as the observer.

The demo's progress view and its report take nothing from inside the
processes: they read what the broker carries. As an outsider (the observer's
credentials) that is each site's retained status (ε spent, outbox depth,
version), the update message ids on the wire (random: the count of updates
sent, not their counters), and the version number of each sealed manifest.
Receipts are sealed to their site and models to the members, so the monitor
is also given the sites' keys (``site_keys``: the demo generated them all):
it opens each site's receipts with that site's key, and plays the first site
to read and score the published ONNX of every version on each site's
held-out rows. Without keys it sees what ``fedline status`` shows.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker_bridge.chunking import Reassembler
from broker_bridge.envelope import content_hash, open_for_federation, open_receipt
from broker_bridge.errors import FedlineError, WireError
from broker_bridge.federation_key import Keyring, open_manifest, sealed_manifest_header
from broker_bridge.keys import KeyPair
from broker_bridge.topics import Topics

log = logging.getLogger("fedline.demo")


@dataclass
class SiteView:
    site: str
    status: dict[str, Any] = field(default_factory=dict)
    verdicts: dict[int, dict[str, Any]] = field(default_factory=dict)  # counter -> last receipt
    staleness: list[int] = field(default_factory=list)
    update_bytes: int = 0  # payload + topic bytes of this site's update chunks seen on the wire
    update_chunks: int = 0
    update_ids: dict[str, float] = field(default_factory=dict)  # msg id -> first seen (random ids: no counters)
    max_outbox_depth: int = 0

    def count(self, verdict: str) -> int:
        return sum(1 for r in self.verdicts.values() if r.get("verdict") == verdict)

    @property
    def updates_sent(self) -> int:
        """Distinct updates seen on the wire (a resend has the same id)."""
        return len(self.update_ids)


@dataclass
class FederationView:
    """Live state of the federation as seen on the wire."""

    sites: dict[str, SiteView]
    version: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # {version, t, metrics{site: value}}
    manifests: dict[int, dict[str, Any]] = field(default_factory=dict)
    onnx: dict[int, bytes] = field(default_factory=dict)
    malformed: int = 0
    started: float = field(default_factory=time.time)

    def totals(self) -> dict[str, int]:
        out = {"applied": 0, "stale": 0, "rejected": 0, "buffered": 0}
        for s in self.sites.values():
            for k in out:
                out[k] += s.count(k)
        return out


class Monitor:
    """Feed it every recorded message (``on_message``); it keeps a :class:`FederationView`.

    ``score(onnx_bytes) -> {site: metric}`` is called for each new version's ONNX.
    """

    def __init__(
        self,
        topics: Topics,
        sites: list[str],
        aggregator_sign_pub: bytes,
        score: Callable[[bytes], dict[str, float]] | None = None,
        site_keys: dict[str, KeyPair] | None = None,
    ) -> None:
        self.topics = topics
        self.sign_pub = aggregator_sign_pub
        self.score = score
        self.site_keys = site_keys or {}
        self.member = self.site_keys.get(sites[0]) if sites else None
        self.keyring = Keyring()
        self._sealed_manifests: list[bytes] = []  # not opened yet (no key of their epoch so far)
        self.view = FederationView({s: SiteView(s) for s in sites})
        self._model_chunks = Reassembler(timeout_s=120)
        self._blobs: dict[str, bytes] = {}  # msg_id -> blob (weights/onnx of recent versions)

    def on_message(self, msg: Any) -> None:
        if not msg.payload:  # a cleared retained message (superseded model version)
            return
        try:
            info = self.topics.parse(msg.topic)
        except (FedlineError, ValueError):
            self.view.malformed += 1
            return
        v = self.view
        if info.kind == "update" and info.site in v.sites:
            sv = v.sites[info.site]
            sv.update_bytes += len(msg.payload) + len(msg.topic)
            sv.update_chunks += 1
            sv.update_ids.setdefault(info.msg_id or "", time.time())
        elif info.kind == "status" and info.site in v.sites:
            try:
                st = json.loads(msg.payload)
                sv = v.sites[info.site]
                sv.status = {**sv.status, **st}  # a last will says only 'offline': keep the last figures
                sv.max_outbox_depth = max(sv.max_outbox_depth, int(st.get("outbox_depth") or 0))
            except ValueError:
                v.malformed += 1
        elif info.kind == "receipts" and info.site in v.sites and info.site in self.site_keys:
            try:
                doc = open_receipt(msg.payload, self.site_keys[info.site], self.sign_pub)
            except FedlineError:
                v.malformed += 1
                return
            sv = v.sites[info.site]
            counter = int(doc.get("counter", -1))
            prev = sv.verdicts.get(counter)
            final = ("applied", "stale", "rejected")
            if prev is not None and prev.get("verdict") in final:
                return  # a resent update's receipt repeats its first verdict
            sv.verdicts[counter] = doc
            if doc.get("verdict") in ("applied", "stale") and doc.get("staleness") is not None:
                sv.staleness.append(int(doc["staleness"]))
        elif info.kind in ("weights", "onnx"):
            try:
                done = self._model_chunks.add(msg.payload)
            except FedlineError:
                v.malformed += 1
                return
            if done is not None:
                self._blobs[done[0]] = done[1]
                self._try_score()
        elif info.kind == "fedkey" and self.member is not None and info.site == self.member.ident:
            try:
                self.keyring.add_grant(msg.payload, self.member, self.sign_pub, self.topics.federation)
            except FedlineError:
                v.malformed += 1
                return
            pending, self._sealed_manifests = self._sealed_manifests, []
            for blob in pending:
                self._open_manifest(blob)
            self._try_score()
        elif info.kind == "manifest":
            try:
                _, version = sealed_manifest_header(msg.payload)  # what an outsider reads: the version
            except FedlineError:
                v.malformed += 1
                return
            v.version = max(v.version, version)
            self._open_manifest(msg.payload)
            self._try_score()

    def _open_manifest(self, blob: bytes) -> None:
        if self.member is None:
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


def site_table(view: FederationView, metric: str, intermittent: str | None, cut: bool) -> Any:
    """A rich table of the live state (the demo's progress view)."""
    from rich.table import Table

    t = Table(
        title=f"fedline demo — global model v{view.version} — {time.time() - view.started:.0f} s", title_justify="left"
    )
    for col in (
        "site",
        "link",
        "updates sent",
        "applied",
        "buffered",
        "stale",
        "rejected",
        "staleness (mean)",
        "ε spent / budget",
        "outbox",
        f"{metric} of latest global",
    ):
        t.add_column(col, justify="right" if col not in ("site", "link") else "left")
    last = view.history[-1]["metrics"] if view.history else {}
    for name, s in view.sites.items():
        st = s.status
        link = "CUT" if (name == intermittent and cut) else (st.get("state", "…"))
        eps = st.get("epsilon")
        budget = st.get("epsilon_budget")
        m = last.get(name)
        t.add_row(
            name + (" *" if name == intermittent else ""),
            link,
            str(s.updates_sent),
            str(s.count("applied")),
            str(s.count("buffered")),
            str(s.count("stale")),
            str(s.count("rejected")),
            f"{np.mean(s.staleness):.2f}" if s.staleness else "–",
            f"{eps:.2f} / {budget:.1f}" if eps is not None and budget else "–",
            str(st.get("outbox_depth", "–")),
            f"{m:.3f}" if isinstance(m, float) else "–",
        )
    return t
