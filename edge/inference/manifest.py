"""From MQTT messages on the model topics to a verified ONNX blob for a new version.

The aggregator publishes, all retained, the ONNX chunks on
``model/<version>/onnx/<i>`` and then the signed manifest on ``model/manifest``.
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
from broker_bridge.envelope import content_hash, verify_manifest
from broker_bridge.errors import ChunkError, TopicError, WireError
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

    def __init__(self, topics: Topics, aggregator_sign_pub: bytes, current_version: Callable[[], int],
                 refuse: Callable[[str, str, int | None], None], max_bytes: int = 256 * 1024 * 1024,
                 keep_blobs: int = 4) -> None:
        self.topics = topics
        self.sign_pub = aggregator_sign_pub
        self.current_version = current_version
        self.refuse = refuse
        self.reassembler = Reassembler(timeout_s=600.0, max_bytes=max_bytes)
        self.keep_blobs = keep_blobs
        self._blobs: OrderedDict[str, tuple[int, bytes]] = OrderedDict()  # msg_id -> (version, blob)
        self._pending: tuple[dict[str, Any], float] | None = None
        self._last_manifest: bytes | None = None

    def filters(self) -> list[str]:
        return [self.topics.manifest(), f"{self.topics.root}/model/+/onnx/#"]

    def handle(self, topic: str, payload: bytes) -> FetchedModel | None:
        try:
            info = self.topics.parse(topic)
        except TopicError as exc:
            self.refuse("framing", str(exc), None)
            return None
        if info.kind == "manifest":
            self._on_manifest(payload)
        elif info.kind == "onnx":
            self._on_chunk(info.version or 0, payload)
        else:
            return None
        return self._try_complete()

    def _on_manifest(self, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained manifest
        if payload == self._last_manifest:
            return  # the same retained manifest again after a reconnect
        self._last_manifest = payload
        try:
            doc = verify_manifest(payload, self.sign_pub)
        except WireError as exc:
            self.refuse(exc.reason, f"manifest: {exc.detail}", None)
            return
        version = doc["version"]
        if doc.get("federation") != self.topics.federation:
            self.refuse("schema", f"manifest is for federation {doc.get('federation')!r}, "
                                  f"this line is in {self.topics.federation!r}", version)
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
        candidates = [(m, b) for m, (v, b) in self._blobs.items()
                      if (m == want_id if want_id else v == version)]
        if not candidates:
            return None  # the ONNX has not arrived yet
        for msg_id, blob in candidates:
            if len(blob) == onnx["size"] and content_hash(blob) == onnx["hash"]:
                self._pending = None
                self._blobs.pop(msg_id, None)
                return FetchedModel(version, blob, onnx["hash"], doc, seen_at)
        self._pending = None
        sizes = ", ".join(str(len(b)) for _, b in candidates)
        self.refuse("hash", f"onnx of version {version} ({sizes} bytes) does not match the manifest's "
                            f"size {onnx['size']} and hash {onnx['hash'][:16]}...", version)
        return None
