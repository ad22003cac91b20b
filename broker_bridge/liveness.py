"""Retained liveness of the aggregator and each line service, with a last will.

Why: a site's edge agent already says ``online``/``offline`` on its status
topic; the aggregator and the lines said nothing, so an operator (``fedline
status``, Prometheus alerting on the observer) could not tell a stopped
aggregator from a quiet one. Each service now keeps a retained document on
``services/<user>/status`` (``<user>`` is its broker username, so the ACL
pattern ``services/%u/status`` lets each write only its own) and leaves a last
will saying ``offline`` that the broker publishes, retained, if it vanishes.

What it carries, and why nothing more: the state, the service kind, the model
version in service and a reason; the aggregator also says the reduce in force
(``mean``/``median``/``trimmed_mean``: a setting, public like the code, so an
operator sees whether the robust default is on). No row counts, scores or timestamps beyond
the broker's own delivery (a competitor reading it learns that the service is
up and which public version it runs, nothing computed from plant data).
"""

from __future__ import annotations

import json
from typing import Any

from broker_bridge.client import MqttClient, will_message
from broker_bridge.topics import Topics


def payload(
    service: str,
    state: str,
    *,
    version: int | None = None,
    reason: str | None = None,
    model_refused: dict[str, Any] | None = None,
    reduce: str | None = None,
) -> bytes:
    """The JSON document: ``{"service", "state", "version"?, "reason"?, "model_refused"?, "reduce"?}``.

    ``model_refused`` (a line): ``{"version", "reason": "step"}``, the last signed version it refused as
    too far a step from the one it serves (``models.step_bound``), so an operator sees it stays behind on
    purpose; computed from public models only.
    """
    doc: dict[str, Any] = {"service": service, "state": state}
    if version is not None:
        doc["version"] = int(version)
    if reason:
        doc["reason"] = reason
    if model_refused:
        doc["model_refused"] = dict(model_refused)
    if reduce:
        doc["reduce"] = reduce
    return json.dumps(doc, sort_keys=True).encode()


class Liveness:
    """The will to give :class:`MqttClient` and the ``online``/``stopped`` announcements."""

    def __init__(self, topics: Topics, user: str, service: str, reduce: str | None = None) -> None:
        self.topic = topics.service_status(user)
        self.service = service
        self.reduce = reduce  # the aggregator's reduce in force, said in every "online"
        self.version: int | None = None
        self.model_refused: dict[str, Any] | None = None

    def will(self) -> Any:
        return will_message(self.topic, payload(self.service, "offline", reason="connection lost"))

    async def online(self, client: MqttClient) -> None:
        """Publish ``online`` (retained); use as (part of) the client's ``on_connect``."""
        await client.publish(
            self.topic,
            payload(self.service, "online", version=self.version, model_refused=self.model_refused, reduce=self.reduce),
            qos=1,
            retain=True,
        )

    async def set_version(self, client: MqttClient | None, version: int | None) -> None:
        """A new model in service: say so if connected."""
        self.version = version
        if client is not None and client.connected.is_set():
            await self.online(client)

    async def stopped(self, client: MqttClient) -> None:
        """A clean stop: ``offline`` with reason ``stopped`` (a will is sent only on a lost connection)."""
        if client.connected.is_set():
            await client.publish(
                self.topic,
                payload(
                    self.service, "offline", version=self.version, reason="stopped", model_refused=self.model_refused
                ),
                qos=1,
                retain=True,
            )
