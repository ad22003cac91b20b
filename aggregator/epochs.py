"""The aggregator's federation content key, one per key epoch (see ``broker_bridge.federation_key``).

Why a new epoch on revocation and on a site's key rotation only: a site that
leaves must not read what is published after it left, so its key is thrown
away; a site whose key was rotated (its old key may have been copied: that is
why keys are rotated) must not leave the thief the current content key, which
the old key opens from the old grant; a site that joins may read the current
epoch's versions (it is a member now), so joining keeps the key. Each member's
public-key fingerprint is kept with the epoch, so a rotation is seen across an
aggregator restart too.

Only the current epoch's key is kept (in the store's ``meta`` table, next to
the model it protects: the state directory is the aggregator's secret already,
it holds every checkpoint in the clear). Older keys are not needed: the
aggregator never re-reads a published version from the broker.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

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
    keys: Mapping[str, str] = field(default_factory=dict)  # member -> fingerprint of its enrolled public keys


class FederationKeys:
    """The current epoch, persisted; :meth:`sync` rotates it when a member is gone."""

    def __init__(self, store: Store) -> None:
        self.store = store
        raw = store.get_meta(_META)
        self.current: Epoch | None = None
        if raw:
            doc = json.loads(raw)
            self.current = Epoch(
                int(doc["epoch"]), base64.b64decode(doc["key"]), frozenset(doc["members"]), doc.get("keys", {})
            )

    def sync(self, members: set[str], keys: Mapping[str, str] | None = None) -> tuple[Epoch, frozenset[str]]:
        """Make the epoch match the enrolled ``members``: ``(epoch, sites revoked since the last one)``.

        A new epoch (fresh key) when a member of the current one is no longer
        enrolled, or its key fingerprint (``keys``) changed; new members join the current epoch.
        """
        keys = dict(keys or {})
        cur = self.current
        revoked = frozenset(cur.members - members) if cur else frozenset()
        old_keys = cur.keys if cur else {}
        rekeyed = sorted(s for s in members if s in old_keys and keys.get(s) != old_keys[s])
        if cur is None or revoked or rekeyed:
            number = cur.number + 1 if cur else 1
            new = Epoch(number, new_content_key(), frozenset(members), keys)
            event(
                log,
                "fedkey.epoch",
                level=logging.WARNING if revoked or rekeyed else logging.INFO,
                epoch=number,
                revoked=sorted(revoked),
                rekeyed=rekeyed,
                members=len(members),
            )
        elif members - cur.members or keys != dict(cur.keys):
            new = Epoch(cur.number, cur.key, frozenset(members), keys)
            if members - cur.members:
                event(log, "fedkey.joined", epoch=cur.number, sites=sorted(members - cur.members))
        else:
            return cur, revoked
        self.store.set_meta(
            _META,
            json.dumps(
                {
                    "epoch": new.number,
                    "key": base64.b64encode(new.key).decode(),
                    "members": sorted(new.members),
                    "keys": dict(sorted(new.keys.items())),
                }
            ),
        )
        self.current = new
        return new, revoked
