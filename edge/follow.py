"""Follow the federation's global model: key grants, sealed manifests, weight chunks -> a checked model.

:class:`ModelFollower` is the one follower of the signed, sealed model, used by the edge agent and
a plant's uplink (a line in manifest mode follows the ONNX instead: ``edge.inference``). It keeps
the site's content keys (a manifest of an epoch not granted yet waits for its grant: retained
messages come in any order), the announced manifest and its chunks, and hands back a
:class:`edge.model_store.GlobalModel` once every chunk is in and every check passed; whoever uses it
decides what to do with it (the edge's step bound, saving; the plant's re-release to its lines).

Collecting the (sealed) weights of the newest global model from its MQTT chunks:

Why buffering before the manifest: on subscribe, a broker delivers the
retained manifest and the retained chunks in no particular order, so chunks
of a version newer than ours are kept (bounded: a few versions, a byte cap)
until its manifest says how many to expect. Chunks may be fedline chunks
(``broker_bridge.chunking``, self-describing) or plain slices numbered by the
topic index; both are accepted. The joined blob is still encrypted under the federation
content key: the agent opens it, and checking the result is :mod:`edge.model_store`'s job.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker_bridge.chunking import MAGIC as CHUNK_MAGIC
from broker_bridge.chunking import parse_chunk
from broker_bridge.envelope import content_hash, encode_tensors, open_for_federation
from broker_bridge.errors import ChunkError, ModelRefused, WireError
from broker_bridge.federation_key import Keyring, open_manifest
from broker_bridge.keys import KeyPair
from edge import follow_steps
from edge.model_store import GlobalModel, check_global_model
from models.spec import ModelSpec


@dataclass
class _Parts:
    first_seen: float = field(default_factory=time.monotonic)
    slices: dict[int, bytes] = field(default_factory=dict)
    held: int = 0


class WeightsCollector:
    """Chunks of model weights by version; :meth:`complete` joins them when all are there."""

    def __init__(self, max_versions: int = 3, max_bytes: int = 256 * 1024 * 1024, timeout_s: float = 600.0) -> None:
        self.max_versions = max_versions
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._parts: dict[int, _Parts] = {}
        self.malformed = 0
        self.received = 0  # chunks kept (a site following by int8 steps should keep no weight chunk)

    def held_bytes(self) -> int:
        return sum(p.held for p in self._parts.values())

    def forget_below(self, version: int) -> None:
        """Drop chunks of versions older than ``version`` (superseded before they completed)."""
        for v in [v for v in self._parts if v < version]:
            del self._parts[v]

    def add(self, version: int, index: int, payload: bytes) -> None:
        """Keep one chunk (raw slice, or a fedline chunk whose own index wins)."""
        now = time.monotonic()
        for v in [v for v, p in self._parts.items() if now - p.first_seen > self.timeout_s]:
            del self._parts[v]
        if payload[:4] == CHUNK_MAGIC:
            try:
                c = parse_chunk(payload)
            except ChunkError:
                self.malformed += 1
                raise
            index, data = c.index, payload  # keep whole chunks; joined by parse order later
        else:
            data = payload
        p = self._parts.setdefault(version, _Parts())
        if index in p.slices:
            return
        while len(self._parts) > self.max_versions or self.held_bytes() + len(data) > self.max_bytes:
            oldest = min(v for v in self._parts if v != version) if len(self._parts) > 1 else None
            if oldest is None:
                raise ChunkError(f"model version {version} exceeds the {self.max_bytes}-byte reassembly cap")
            del self._parts[oldest]
        p.slices[index] = data
        p.held += len(data)
        self.received += 1

    def complete(self, version: int, chunks: int) -> bytes | None:
        """The joined weights blob when all ``chunks`` pieces of ``version`` are here, else None."""
        p = self._parts.get(version)
        if p is None or any(i not in p.slices for i in range(chunks)):
            return None
        pieces = [p.slices[i] for i in range(chunks)]
        if pieces and pieces[0][:4] == CHUNK_MAGIC:
            blob = b"".join(parse_chunk(x).payload for x in pieces)
        else:
            blob = b"".join(pieces)
        del self._parts[version]
        return blob


class ModelFollower:
    """One site's view of the published model: ``on_grant``, ``on_manifest``, ``on_chunk``, then ``complete``.

    ``wants(version)`` says whether a version is worth fetching (newer than the one in use). Every
    refusal is a :class:`ModelRefused` naming the version and a counting reason.
    """

    def __init__(
        self,
        keys: KeyPair,
        aggregator_sign_pub: bytes,
        federation: str,
        spec: ModelSpec,
        shared_names: list[str],
        shapes: dict[str, tuple[int, ...]],
        wants: Callable[[int], bool],
        keyring: Keyring | None = None,
        base: Callable[[], GlobalModel] | None = None,
    ) -> None:
        self.keys = keys
        self.sign_pub = aggregator_sign_pub
        self.federation = federation
        self.spec = spec
        self.shared_names = shared_names  # what the manifest's weights must name (the personal layers stay home)
        self.shapes = shapes
        self.wants = wants
        self.keyring = Keyring() if keyring is None else keyring  # content keys by epoch, from this site's grants
        self.collector = WeightsCollector()
        self.pending: tuple[int, bytes, dict[str, Any]] | None = None  # (version, signed manifest, manifest)
        # following by int8 steps (edge.follow_steps): the model in use, the steps' chunks, and whether the
        # pending version comes from its step (else from its full weights)
        self.base = base
        self.steps = WeightsCollector()
        self.by_step = False
        self.step_failures = 0  # steps that did not make the signed weights (then the full weights were used)
        self._waiting_for_key: bytes | None = None  # a sealed manifest of an epoch not granted (yet)
        self._held: tuple[int, dict[str, bytes]] | None = None  # the model in use: version, its encodings by hash

    def on_grant(self, blob: bytes) -> int:
        """Keep a key grant sealed to this site; its epoch (raises :class:`WireError`)."""
        return self.keyring.add_grant(blob, self.keys, self.sign_pub, self.federation)

    @property
    def waiting_for_key(self) -> bool:
        """A manifest waits for the grant of its epoch."""
        return self._waiting_for_key is not None

    def take_waiting(self) -> bytes | None:
        """The sealed manifest kept for a grant, to hand to :meth:`on_manifest` again now that one arrived."""
        waiting, self._waiting_for_key = self._waiting_for_key, None
        return waiting

    def on_manifest(self, sealed: bytes) -> int | None:
        """A sealed manifest: the version now expected (None: waits for its grant, or not wanted)."""
        try:
            doc, blob = open_manifest(sealed, self.keyring, self.sign_pub)
        except WireError as exc:
            if exc.reason == "epoch":  # retained messages come in any order: its grant may be next
                self._waiting_for_key = bytes(sealed)
                return None
            raise ModelRefused("manifest", str(exc)) from None
        version = doc["version"]
        if not self.wants(version):
            return None
        if doc.get("federation") != self.federation:
            raise ModelRefused("federation", f"manifest is for federation {doc.get('federation')!r}", version)
        chunks = doc["weights"].get("chunks")
        if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
            raise ModelRefused("manifest", f"manifest weights.chunks {chunks!r} is not a positive integer", version)
        self.pending = (version, bytes(blob), doc)
        self.by_step = self.base is not None and follow_steps.applies(doc, self.base())
        self.collector.forget_below(version)
        self.steps.forget_below(version)
        return version

    def give_up_step(self, version: int) -> bool:
        """Take ``version`` from its full weights instead of its step, if it is still pending by step.

        Why: a step whose chunks never arrive (lost while the broker restarted, or never published) would
        otherwise hold the site on its old model until the next manifest or a catch-up.
        """
        if self.pending is None or self.pending[0] != version or not self.by_step:
            return False
        self.by_step = False
        self.step_failures += 1
        return True

    def on_chunk(self, version: int, index: int, payload: bytes) -> None:
        """Keep one weight chunk of a version worth having (raises :class:`WireError` on a malformed one)."""
        if self.wants(version):
            self.collector.add(version, index, payload)

    def on_step_chunk(self, version: int, index: int, payload: bytes) -> None:
        """Keep one chunk of a version's int8 step (only a follower given the model in use keeps them)."""
        if self.base is not None and self.wants(version):
            self.steps.add(version, index, payload)

    def complete(self) -> GlobalModel | None:
        """The announced version, opened and checked, once all its chunks are in (None until then)."""
        if self.pending is None:
            return None
        version, manifest_blob, doc = self.pending
        key = self.keyring.get(doc.get("epoch"))  # type: ignore[arg-type]
        if self.by_step and self.base is not None:
            sealed = self.steps.complete(version, doc["delta"]["chunks"])
            if sealed is None:
                return None
            if key is None:
                raise ModelRefused("epoch", f"no content key for epoch {doc.get('epoch')}", version)
            try:  # the step's hash, then the weights' hash of what it makes: both signed in the manifest
                weights = follow_steps.apply(doc, open_for_federation(sealed, key), self.base())
            except (WireError, ModelRefused) as exc:
                self.by_step = False  # the full weights of this version instead (the agent fetches them)
                self.step_failures += 1
                raise ModelRefused("int8_step", f"{exc}; fetching the full weights", version) from None
            self.pending = None
            return self._checked(manifest_blob, weights)
        sealed = self.collector.complete(version, doc["weights"]["chunks"])
        if sealed is None:
            held = self.held(version, doc)
            if held is None:
                return None
            self.pending = None
            return self._checked(manifest_blob, held)
        self.pending = None
        if key is None:
            raise ModelRefused("epoch", f"no content key for epoch {doc.get('epoch')}", version)
        try:
            weights = open_for_federation(sealed, key)
        except WireError as exc:
            raise ModelRefused("decrypt", f"weights {exc}", version) from None
        return self._checked(manifest_blob, weights)

    def held(self, version: int, doc: dict[str, Any]) -> bytes | None:
        """The weights of ``version`` when this site already holds them, else None.

        Why: a site starts from version 0 built from the model seed, which is the aggregator's version 0 when
        the seeds agree; a restarted site holds the version it saved. When the model in use is that version
        and its encoding has the signed manifest's hash, it is those exact bytes: nothing to download (the
        agent subscribes to a version's chunks only when it does not hold it). Computed once per version.
        """
        base = self.base() if self.base is not None else None
        if base is None or base.version != version:
            return None
        if self._held is None or self._held[0] != version:
            # the stored blob, or (version 0 from the seed) its FLT1 and FLT2 encodings: the manifest's hash says
            blobs = (
                [base.weights_blob] if base.weights_blob else [encode_tensors(base.shared, r) for r in (False, True)]
            )
            self._held = (version, {content_hash(b): b for b in blobs})
        return self._held[1].get(doc["weights"].get("hash"))

    def _checked(self, manifest_blob: bytes, weights: bytes) -> GlobalModel | None:
        g = check_global_model(
            manifest_blob, weights, self.sign_pub, self.federation, self.spec, self.shared_names, self.shapes
        )
        return g if self.wants(g.version) else None
