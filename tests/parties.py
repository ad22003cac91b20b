"""A party on the federation broker, as the aggregator's tests and the hostile tests both need one.

Why one class: a genuine site and an attacker with a broker login do the same
thing on the wire (publish chunked blobs, read signed receipts on their own
receipt topic); only what they send differs.
"""

from __future__ import annotations

import asyncio

from broker_bridge import chunking, envelope
from broker_bridge.client import MqttClient
from broker_bridge.keys import KeyPair
from broker_bridge.topics import Topics
from tests.conftest import eventually, settings_for


class Party:
    """Someone with a broker login: publishes chunked blobs, collects verified receipts for its login."""

    def __init__(
        self, broker, user: str, agg_sign_pub: bytes, federation: str, chunk: int = 4096, keys: KeyPair | None = None
    ) -> None:
        self.user = self.site = user
        self.keys = keys  # the site's keys open its sealed receipts; without them, receipts are only counted
        self.sealed_receipts = 0
        self.chunk = chunk
        self.client = MqttClient(settings_for(broker, user, max_chunk=chunk))
        self.topics = Topics(federation)
        self.agg_sign_pub = agg_sign_pub
        self.receipts: list[dict] = []
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Party:
        await self.client.__aenter__()
        await self.client.subscribe(self.topics.receipts(self.user))
        await self.client.wait_connected(10)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await self.client.__aexit__(*exc)

    async def _read(self) -> None:
        async for m in self.client.messages():
            self.sealed_receipts += 1
            if self.keys is not None:
                self.receipts.append(envelope.open_receipt(m.payload, self.keys, self.agg_sign_pub))

    async def send(self, blob: bytes, msg_id: str, as_site: str | None = None) -> None:
        """Publish ``blob`` in chunks on the update topic of ``as_site`` (default: its own)."""
        site = as_site or self.user
        await self.client.publish_many(
            [
                (self.topics.update_chunk(site, msg_id, i), c)
                for i, c in enumerate(chunking.split(blob, msg_id, self.chunk))
            ]
        )

    def receipt(self, counter: int) -> dict | None:
        return next((r for r in self.receipts if r["counter"] == counter), None)

    async def verdict(self, n_before: int) -> tuple[str, str | None, int]:
        """The next receipt after the first ``n_before``: verdict, reason, counter."""
        await eventually(lambda: len(self.receipts) > n_before, 20)
        r = self.receipts[n_before]
        return r["verdict"], r["reason"], r["counter"]
