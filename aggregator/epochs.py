"""The aggregator's federation content key, one per key epoch (see ``broker_bridge.federation_key``).

Why a new epoch on revocation only: a site that leaves must not read what is
published after it left, so its key is thrown away; a site that joins may read
the current epoch's versions (it is a member now), so joining keeps the key.

Only the current epoch's key is kept (in the store's ``meta`` table, next to
the model it protects: the state directory is the aggregator's secret already,
it holds every checkpoint in the clear). Older keys are not needed: the
aggregator never re-reads a published version from the broker.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass

from aggregator.store import Store
from broker_bridge.federation_key import new_content_key
from fedline.logs import event

log = logging.getLogger("fedline.aggregator.epochs")

_META = "federation_key"


@dataclass(frozen=True)
class Epoch:
    number: int
    key: bytes
    members: frozenset[str]


class FederationKeys:
    """The current epoch, persisted; :meth:`sync` rotates it when a member is gone."""

    def __init__(self, store: Store) -> None:
        self.store = store
        raw = store.get_meta(_META)
        self.current: Epoch | None = None
        if raw:
            doc = json.loads(raw)
            self.current = Epoch(int(doc["epoch"]), base64.b64decode(doc["key"]), frozenset(doc["members"]))

    def sync(self, members: set[str]) -> tuple[Epoch, frozenset[str]]:
        """Make the epoch match the enrolled ``members``: ``(epoch, sites revoked since the last one)``.

        A new epoch (fresh key) when a member of the current one is no longer
        enrolled; new members join the current epoch.
        """
        cur = self.current
        revoked = frozenset(cur.members - members) if cur else frozenset()
        if cur is None or revoked:
            number = cur.number + 1 if cur else 1
            new = Epoch(number, new_content_key(), frozenset(members))
            event(
                log,
                "fedkey.epoch",
                level=logging.WARNING if revoked else logging.INFO,
                epoch=number,
                revoked=sorted(revoked),
                members=len(members),
            )
        elif members - cur.members:
            new = Epoch(cur.number, cur.key, frozenset(members))
            event(log, "fedkey.joined", epoch=cur.number, sites=sorted(members - cur.members))
        else:
            return cur, revoked
        self.store.set_meta(
            _META,
            json.dumps(
                {"epoch": new.number, "key": base64.b64encode(new.key).decode(), "members": sorted(new.members)}
            ),
        )
        self.current = new
        return new, revoked
