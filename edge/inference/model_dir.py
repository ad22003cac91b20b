"""The model directory shared by the edge agent (writer) and the line inference (reader).

Layout and rules are in the package docstring (:mod:`edge.inference`). Why a
pointer file and immutable model files: a rename is atomic, but a reader that
opened ``current.onnx`` and then ``current.json`` could pair a new model with
old metadata. With ``current.json`` naming an immutable ``v<version>-<hash>.onnx``,
the pointer and the bytes it names always agree, and the hash check catches a
writer that broke the rules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker_bridge.envelope import content_hash
from fedline.fsutil import atomic_write

POINTER = "current.json"
DEFAULT_FILE = "current.onnx"


class ModelDirError(ValueError):
    """``current.json`` is unreadable or malformed (names the file and what is wrong)."""


@dataclass(frozen=True)
class ModelPointer:
    """What ``current.json`` says: which version, which bytes (by hash), in which file."""

    version: int
    hash: str
    file: str = DEFAULT_FILE
    meta: dict[str, Any] = field(default_factory=dict)


def model_file_name(version: int, blob_hash: str) -> str:
    return f"v{int(version)}-{blob_hash[:12]}.onnx"


def publish_model(model_dir: str | Path, onnx: bytes, version: int, keep: int = 3, **meta: Any) -> ModelPointer:
    """Write ``onnx`` as ``version`` into ``model_dir`` the way the reader expects.

    The edge agent calls this after exporting the personalised model. Older
    model files beyond the newest ``keep`` are removed.
    """
    d = Path(model_dir)
    h = content_hash(onnx)
    name = model_file_name(version, h)
    atomic_write(d / name, onnx)
    doc = {**meta, "version": int(version), "hash": h, "file": name}
    atomic_write(d / POINTER, (json.dumps(doc, sort_keys=True) + "\n").encode())
    models = sorted(d.glob("v*-*.onnx"), key=lambda p: p.stat().st_mtime_ns)
    for old in models[:-keep] if keep > 0 else []:
        if old.name != name:
            old.unlink(missing_ok=True)
    return ModelPointer(int(version), h, name, dict(meta))


def read_pointer(model_dir: str | Path) -> ModelPointer | None:
    """Parse ``current.json``; None when there is none yet, :class:`ModelDirError` when it is bad."""
    path = Path(model_dir) / POINTER
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelDirError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ModelDirError(f"{path}: must be a JSON object")
    version, h, name = doc.get("version"), doc.get("hash"), doc.get("file", DEFAULT_FILE)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ModelDirError(f"{path}: 'version' must be a non-negative integer, got {version!r}")
    if not isinstance(h, str) or len(h) != 64:
        raise ModelDirError(f"{path}: 'hash' must be the 64-digit hex BLAKE2b-256 of the model, got {h!r}")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ModelDirError(f"{path}: 'file' must be a plain file name in the model directory, got {name!r}")
    meta = {k: v for k, v in doc.items() if k not in ("version", "hash", "file")}
    return ModelPointer(version, h, name, meta)


def read_model(model_dir: str | Path, pointer: ModelPointer) -> bytes | None:
    """The bytes ``pointer`` names, or None if that file is gone (replaced meanwhile)."""
    try:
        return (Path(model_dir) / pointer.file).read_bytes()
    except FileNotFoundError:
        return None
