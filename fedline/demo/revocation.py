"""A site that leaves the federation mid-run: the demo's revocation (``--revoke-spare-after-version``).

Why a spare: revoking one of the demo's training sites would change what the
run measures. The spare is enrolled like any site (keys made by the demo, so
it receives the federation content key of the first epoch) but runs nothing;
once the global model reaches the given version it is deleted from the
enrollment file, as ``fedline keys revoke`` does. The running aggregator takes
the change, starts a new key epoch and clears the spare's key grant; the
adversarial capture test then checks that the spare's keys open nothing the
broker carried after that.
"""

from __future__ import annotations

import time
from typing import Any

from broker_bridge.keys import Enrollment, KeyPair
from fedline.demo.workspace import Workspace

SPARE = "spare"


class SpareRevocation:
    """Enrols the spare at construction; :meth:`step` revokes it once ``after_version`` exists."""

    def __init__(self, ws: Workspace, after_version: int) -> None:
        self.path = ws.keys / "enrollment.json"
        self.after_version = after_version
        keys = KeyPair.generate("site", SPARE)
        keys.save(ws.keys / f"{SPARE}.key")
        enr = Enrollment.load(self.path)
        enr.add(keys.public())
        enr.save(self.path)
        self.revoked_at: float | None = None
        self.revoked_at_version: int | None = None

    def step(self, version: int) -> None:
        """Called with the newest global version seen; revokes the spare the first time it is reached."""
        if self.revoked_at is not None or version < self.after_version:
            return
        enr = Enrollment.load(self.path)
        enr.revoke(SPARE)
        enr.save(self.path)  # atomic: the aggregator reads the old file or the new one
        self.revoked_at, self.revoked_at_version = time.time(), version

    def report(self) -> dict[str, Any]:
        return {
            "site": SPARE,
            "after_version": self.after_version,
            "revoked_at": self.revoked_at,
            "revoked_at_version": self.revoked_at_version,
        }
