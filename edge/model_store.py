"""The site's models on disk: the last good global model, its own personal
parameters, and the personalised ONNX it hands to the line inference.

Why files written with temp + fsync + rename: a crash must leave either the
old or the new file, never half of one; the line-inference service watches
``model_dir`` and must never load a torn ONNX file. The global model is kept
as the aggregator's *signed* manifest and the weights blob, and re-verified
on start-up, so a file tampered with on disk is refused like one from the wire.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from broker_bridge.envelope import content_hash, decode_tensors, encode_tensors, spec_hash, verify_manifest
from broker_bridge.errors import ModelRefused, WireError
from fedline.fsutil import atomic_write
from models.spec import ModelSpec


@dataclass(frozen=True)
class GlobalModel:
    """A verified global model: version, the signed manifest, and its shared arrays."""

    version: int
    manifest: dict[str, Any]
    manifest_blob: bytes
    weights_blob: bytes
    shared: dict[str, np.ndarray]


def _check_spec(manifest: dict[str, Any], spec: ModelSpec, version: int) -> None:
    """The manifest's spec is this site's: given whole, or by its hash (``spec_hash``, FLM2)."""
    if "spec_hash" in manifest:
        mine = spec_hash(spec.to_dict())
        if manifest["spec_hash"] != mine:
            raise ModelRefused(
                "spec", f"manifest spec hash {manifest['spec_hash']} is not this site's ({mine})", version
            )
        return
    try:
        their_spec = ModelSpec.from_dict(manifest["spec"])
    except Exception as exc:  # ConfigError or a non-dict
        raise ModelRefused("spec", f"manifest spec is not valid: {exc}", version) from None
    if their_spec != spec:
        raise ModelRefused(
            "spec", f"manifest spec {their_spec.to_dict()} differs from this site's {spec.to_dict()}", version
        )


def check_global_model(
    manifest_blob: bytes,
    weights_blob: bytes,
    aggregator_sign_pub: bytes,
    federation: str,
    spec: ModelSpec,
    shared_names: list[str],
    shapes: dict[str, tuple[int, ...]],
) -> GlobalModel:
    """Verify a manifest and its weights against this site's expectations, or raise :class:`ModelRefused`."""
    try:
        manifest = verify_manifest(manifest_blob, aggregator_sign_pub)
    except WireError as exc:
        raise ModelRefused("manifest", str(exc)) from None
    version = manifest["version"]
    if manifest["federation"] != federation:
        raise ModelRefused(
            "federation", f"manifest is for federation {manifest['federation']!r}, not {federation!r}", version
        )
    _check_spec(manifest, spec, version)
    w = manifest["weights"]
    if w.get("size") != len(weights_blob):
        raise ModelRefused("size", f"weights are {len(weights_blob)} bytes, manifest says {w.get('size')}", version)
    if w.get("hash") != content_hash(weights_blob):
        raise ModelRefused("hash", "weights hash does not match the manifest", version)
    try:
        arrays = decode_tensors(weights_blob)
    except WireError as exc:
        raise ModelRefused("decode", f"weights do not decode: {exc}", version) from None
    if set(arrays) != set(shared_names):
        raise ModelRefused("names", f"weights name {sorted(arrays)}, the model shares {shared_names}", version)
    shared: dict[str, np.ndarray] = {}
    for name in shared_names:
        a = arrays[name]
        if tuple(a.shape) != shapes[name]:
            raise ModelRefused("shape", f"weight {name!r} has shape {tuple(a.shape)}, expected {shapes[name]}", version)
        if a.dtype != np.float32 or not np.isfinite(a).all():
            raise ModelRefused("finite", f"weight {name!r} is not finite float32", version)
        shared[name] = np.array(a, dtype=np.float32)
    return GlobalModel(version, manifest, bytes(manifest_blob), bytes(weights_blob), shared)


class ModelStore:
    """Files under ``data_dir/model`` (last good global, personal arrays) and ``model_dir`` (ONNX)."""

    def __init__(self, data_dir: Path, model_dir: Path) -> None:
        self.dir = data_dir / "model"
        self.model_dir = model_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model_dir.mkdir(parents=True, exist_ok=True)

    def save_global(self, g: GlobalModel) -> None:
        # weights first: a crash between the two leaves a manifest that refuses the old weights, not a mix
        atomic_write(self.dir / "global.weights", g.weights_blob)
        atomic_write(self.dir / "global.manifest", g.manifest_blob)

    def load_global_blobs(self) -> tuple[bytes, bytes] | None:
        m, w = self.dir / "global.manifest", self.dir / "global.weights"
        if not (m.exists() and w.exists()):
            return None
        return m.read_bytes(), w.read_bytes()

    def save_personal(self, arrays: dict[str, np.ndarray]) -> None:
        atomic_write(self.dir / "personal.bin", encode_tensors(arrays))

    def load_personal(self) -> dict[str, np.ndarray] | None:
        p = self.dir / "personal.bin"
        if not p.exists():
            return None
        return {k: np.array(v, np.float32) for k, v in decode_tensors(p.read_bytes()).items()}

    def publish_onnx(
        self,
        onnx: bytes,
        *,
        site: str,
        version: int,
        spec: ModelSpec,
        counter: int,
        served: dict[str, Any] | None = None,
    ) -> Path:
        """Hand a personalised ONNX to the line inference, by its model-directory rules.

        ``served`` (``[personal] serve = "pick"``): which candidate this is and its validation
        metric (:class:`edge.personal.Choice`), written into ``current.json`` for the line.

        ``edge.inference.model_dir.publish_model`` writes an immutable
        ``v<version>-<hash>.onnx`` and then the ``current.json`` pointer naming it.
        """
        from edge.inference.model_dir import publish_model

        meta: dict[str, Any] = {
            "site": site,
            "local_round": counter,
            "personalised": bool(spec.personal) or bool(served),
            "spec": spec.to_dict(),
            "created_at": time.time(),
        }
        if served:
            meta["served"] = served
        pointer = publish_model(self.model_dir, onnx, version, **meta)
        return self.model_dir / pointer.file
