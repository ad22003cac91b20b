"""From MQTT messages on the model topics to a verified ONNX blob for a new version.

The aggregator publishes, all retained, the ONNX chunks on
``model/<version>/onnx/<i>`` and then the signed manifest on ``model/manifest``,
both encrypted under the federation content key (members only, issue 13). The
line gets that key as its site does: the grant retained on
``sites/<site>/fedkey``, sealed to the site's X25519 key, which the line reads
from the site's key file (``[line] site_key``): a line is part of its site.
A subscriber may get them in any order (retained messages on subscribe, a
reconnect in between), so chunks are reassembled as they come and kept for a
few recent messages, and a verified manifest waits for its ONNX. A manifest is
taken only if its signature verifies with the aggregator's key, it names this
federation, its version is newer than the one in service, and the blob's size
and ``content_hash`` match it. Everything else is counted, logged and dropped.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broker_bridge.chunking import Reassembler
from broker_bridge.envelope import content_hash, open_for_federation
from broker_bridge.errors import ChunkError, TopicError, WireError
from broker_bridge.federation_key import Keyring, open_manifest
from broker_bridge.keys import KeyPair
from broker_bridge.topics import Topics
from fedline.logs import event

log = logging.getLogger("fedline.infer.manifest")


@dataclass(frozen=True)
class FetchedModel:
    version: int
    blob: bytes
    hash: str
    manifest: dict[str, Any]
    seen_at: float  # monotonic time the manifest was first received


class ManifestWatcher:
    """Feed it every message of :meth:`filters`; it returns a :class:`FetchedModel` when one is complete.

    ``refuse(reason, detail, version)`` is called for every message or model it
    drops, so the service can count and report refusals in one place.
    ``current_version()`` says which version is in service (or blocked after a
    rollback), so replays of old signed manifests are ignored.
    """

    def __init__(
        self,
        topics: Topics,
        aggregator_sign_pub: bytes,
        site_keys: KeyPair,
        current_version: Callable[[], int],
        refuse: Callable[[str, str, int | None], None],
        max_bytes: int = 256 * 1024 * 1024,
        keep_blobs: int = 4,
    ) -> None:
        self.topics = topics
        self.sign_pub = aggregator_sign_pub
        self.site_keys = site_keys
        self.keyring = Keyring()
        self._waiting_for_key: bytes | None = None  # a sealed manifest of an epoch not granted (yet)
        self.current_version = current_version
        self.refuse = refuse
        self.reassembler = Reassembler(timeout_s=600.0, max_bytes=max_bytes)
        self.keep_blobs = keep_blobs
        self._blobs: OrderedDict[str, tuple[int, bytes]] = OrderedDict()  # msg_id -> (version, blob)
        self._pending: tuple[dict[str, Any], float] | None = None
        self._last_manifest: bytes | None = None

    def filters(self) -> list[str]:
        return [self.topics.fedkey(self.site_keys.ident), self.topics.manifest(), f"{self.topics.root}/model/+/onnx/#"]

    def handle(self, topic: str, payload: bytes) -> FetchedModel | None:
        try:
            info = self.topics.parse(topic)
        except TopicError as exc:
            self.refuse("framing", str(exc), None)
            return None
        if info.kind == "fedkey" and info.site == self.site_keys.ident:
            self._on_grant(payload)
        elif info.kind == "manifest":
            self._on_manifest(payload)
        elif info.kind == "onnx":
            self._on_chunk(info.version or 0, payload)
        else:
            return None
        return self._try_complete()

    def _on_grant(self, payload: bytes) -> None:
        if not payload:
            return  # cleared: this site was revoked; it keeps what it had
        try:
            epoch = self.keyring.add_grant(payload, self.site_keys, self.sign_pub, self.topics.federation)
        except WireError as exc:
            self.refuse(exc.reason, f"key grant: {exc.detail}", None)
            return
        event(log, "fedkey.received", epoch=epoch)
        waiting, self._waiting_for_key = self._waiting_for_key, None
        if waiting is not None:
            self._last_manifest = None
            self._on_manifest(waiting)

    def _on_manifest(self, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained manifest
        if payload == self._last_manifest:
            return  # the same retained manifest again after a reconnect
        self._last_manifest = payload
        try:
            doc, _ = open_manifest(payload, self.keyring, self.sign_pub)
        except WireError as exc:
            if exc.reason == "epoch":  # its grant may come next (retained messages arrive in any order)
                self._waiting_for_key = payload
                event(log, "manifest.waiting_for_key", level=logging.DEBUG, detail=exc.detail)
                return
            self.refuse(exc.reason, f"manifest: {exc.detail}", None)
            return
        version = doc["version"]
        if doc.get("federation") != self.topics.federation:
            self.refuse(
                "schema",
                f"manifest is for federation {doc.get('federation')!r}, this line is in {self.topics.federation!r}",
                version,
            )
            return
        onnx = doc["onnx"]
        if not isinstance(onnx.get("hash"), str) or not isinstance(onnx.get("size"), int):
            self.refuse("schema", "manifest onnx entry needs a string hash and an integer size", version)
            return
        if version <= self.current_version():
            event(log, "manifest.not_newer", level=logging.DEBUG, version=version, current=self.current_version())
            return
        if self._pending is not None and self._pending[0]["version"] >= version:
            return
        event(log, "manifest.received", version=version, onnx_bytes=onnx["size"], chunks=onnx.get("chunks"))
        self._pending = (doc, time.monotonic())

    def _on_chunk(self, version: int, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained chunk
        try:
            done = self.reassembler.add(payload)
        except ChunkError as exc:
            self.refuse("framing", f"onnx chunk of version {version}: {exc.detail}", version)
            return
        if done is None:
            return
        msg_id, blob = done
        self._blobs[msg_id] = (version, blob)
        while len(self._blobs) > self.keep_blobs:
            self._blobs.popitem(last=False)

    def _try_complete(self) -> FetchedModel | None:
        if self._pending is None:
            return None
        doc, seen_at = self._pending
        version, onnx = doc["version"], doc["onnx"]
        if version <= self.current_version():
            self._pending = None
            return None
        want_id = onnx.get("msg_id")
        candidates = [(m, b) for m, (v, b) in self._blobs.items() if (m == want_id if want_id else v == version)]
        if not candidates:
            return None  # the ONNX has not arrived yet
        key = self.keyring.get(doc["epoch"])
        for msg_id, sealed in candidates:
            try:
                blob = open_for_federation(sealed, key) if key is not None else b""
            except WireError:
                blob = b""
            if len(blob) == onnx["size"] and content_hash(blob) == onnx["hash"]:
                self._pending = None
                self._blobs.pop(msg_id, None)
                return FetchedModel(version, blob, onnx["hash"], doc, seen_at)
        self._pending = None
        sizes = ", ".join(str(len(b)) for _, b in candidates)
        self.refuse(
            "hash",
            f"onnx of version {version} ({sizes} sealed bytes) does not open to the manifest's "
            f"size {onnx['size']} and hash {onnx['hash'][:16]}...",
            version,
        )
        return None
