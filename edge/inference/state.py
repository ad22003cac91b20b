"""What the line keeps on disk: the model in service, the previous good one, rollback requests.

Why: after a restart (power cut, update) the line must score at once with the
model it trusted, without waiting for the broker; and ``fedline infer
--rollback`` must work whether or not the service is running. Layout::

    <state_dir>/models/v<version>-<hash[:12]>.onnx   models in service / previous (immutable)
    <state_dir>/serving.json                         {"current": {...}, "previous": {...} | null,
                                                      "blocked_version": int, "origin": "manifest"}
    <state_dir>/rollback.request                     created by `fedline infer --rollback`;
                                                     the service applies it and deletes it

All writes are temp file + fsync + rename.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.inference.model_dir import atomic_write, model_file_name

SERVING = "serving.json"
ROLLBACK_REQUEST = "rollback.request"


@dataclass(frozen=True)
class SavedModel:
    version: int
    hash: str
    file: str
    origin: str

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "hash": self.hash, "file": self.file, "origin": self.origin}

    @classmethod
    def from_dict(cls, d: Any) -> SavedModel | None:
        if not isinstance(d, dict):
            return None
        try:
            return cls(int(d["version"]), str(d["hash"]), str(d["file"]), str(d.get("origin", "")))
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class Serving:
    current: SavedModel | None
    previous: SavedModel | None
    blocked_version: int = -1  # newest version rolled back from
    blocked: tuple[tuple[int, str], ...] = ()  # (version, hash) of models rolled back from: never again


class StateDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.models = self.path / "models"

    def save_model(self, version: int, blob_hash: str, blob: bytes, origin: str) -> SavedModel:
        name = model_file_name(version, blob_hash)
        target = self.models / name
        if not target.exists():
            atomic_write(target, blob)
        return SavedModel(version, blob_hash, name, origin)

    def read_model(self, saved: SavedModel) -> bytes | None:
        try:
            return (self.models / saved.file).read_bytes()
        except FileNotFoundError:
            return None

    def load(self) -> Serving:
        try:
            doc = json.loads((self.path / SERVING).read_bytes())
        except (FileNotFoundError, ValueError):
            return Serving(None, None)
        if not isinstance(doc, dict):
            return Serving(None, None)
        blocked = doc.get("blocked_version", -1)
        pairs = tuple(
            (int(b[0]), str(b[1]))
            for b in doc.get("blocked", [])
            if isinstance(b, list) and len(b) == 2 and isinstance(b[0], int)
        )
        return Serving(
            SavedModel.from_dict(doc.get("current")),
            SavedModel.from_dict(doc.get("previous")),
            blocked if isinstance(blocked, int) else -1,
            pairs,
        )

    def save(self, serving: Serving) -> None:
        doc = {
            "current": serving.current.to_dict() if serving.current else None,
            "previous": serving.previous.to_dict() if serving.previous else None,
            "blocked_version": serving.blocked_version,
            "blocked": [list(b) for b in serving.blocked[-32:]],
            "saved_at": time.time(),
        }
        atomic_write(self.path / SERVING, (json.dumps(doc, indent=2) + "\n").encode())
        keep = {m.file for m in (serving.current, serving.previous) if m}
        for f in self.models.glob("v*-*.onnx"):
            if f.name not in keep:
                f.unlink(missing_ok=True)

    # -- rollback requests (from the CLI) ------------------------------------
    def request_rollback(self) -> Path:
        p = self.path / ROLLBACK_REQUEST
        atomic_write(p, json.dumps({"requested_at": time.time()}).encode())
        return p

    def rollback_requested(self) -> bool:
        return (self.path / ROLLBACK_REQUEST).exists()

    def clear_rollback_request(self) -> None:
        (self.path / ROLLBACK_REQUEST).unlink(missing_ok=True)

    def rollback_offline(self) -> Serving | None:
        """Roll back in the files when no service is running; None if there is no previous model."""
        serving = self.load()
        if serving.current is None or serving.previous is None:
            return None
        bad = serving.current
        new = Serving(
            serving.previous,
            None,
            max(serving.blocked_version, bad.version),
            (*serving.blocked, (bad.version, bad.hash)),
        )
        self.save(new)
        self.clear_rollback_request()
        return new
