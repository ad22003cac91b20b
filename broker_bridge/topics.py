"""Every MQTT topic fedline uses, built and parsed in one place.

Layout under ``<prefix>/<federation>/`` (DESIGN.md):

- ``sites/<site>/update/<msg_id>/<i>``: chunk i of one sealed update
- ``sites/<site>/receipts``: the aggregator's signed verdicts for that site
- ``sites/<site>/status``: retained status, ``offline`` by last will
- ``sites/<site>/fedkey``: retained, the federation content key of the current
  epoch sealed to that site's X25519 key (``broker_bridge.federation_key``)
- ``sites/<site>/recovery/request`` and ``.../answer``: a site that lost its data directory asks the
  aggregator for its last counter and privacy history (``broker_bridge.recovery``)
- ``services/<user>/status``: retained liveness of the aggregator and each line (``<user>`` is
  its broker username), ``offline`` by last will (:mod:`broker_bridge.liveness`)
- ``intake/<worker>/<msg_id>/<i>``: chunk i of an intake worker's forward to the
  reducer (``aggregator.forward``): only workers publish there, only the aggregator reads
- ``model/manifest``: retained, signed manifest of the current global model
- ``model/<version>/weights/<i>`` and ``model/<version>/onnx/<i>``: model chunks

Site ids become topic levels and ACL patterns, so they are restricted to a
safe alphabet; anything with ``+``, ``#``, ``/`` or nothing at all is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from broker_bridge.errors import TopicError

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def validate_site_id(site: object, what: str = "site id") -> str:
    """Return ``site`` if it is a valid id, else raise :class:`TopicError` saying why."""
    if not isinstance(site, str) or not site:
        raise TopicError(f"{what} must be a non-empty string, got {site!r}")
    for bad in ("+", "#", "/"):
        if bad in site:
            raise TopicError(f"{what} {site!r} contains {bad!r}, which MQTT reserves")
    if not _SAFE.fullmatch(site):  # fullmatch: "$" alone would accept a trailing newline
        raise TopicError(
            f"{what} {site!r} must be 1-64 characters of letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return site


@dataclass(frozen=True)
class TopicInfo:
    """What a parsed topic names. Fields that do not apply are None."""

    kind: str  # update | forward (site = the worker) | receipts | status | fedkey | service_status | manifest | weights | onnx | delta | secagg_{cohort,survivors,request,reply} | recovery_{request,answer}
    site: str | None = None  # for service_status: the service's broker username
    msg_id: str | None = None
    index: int | None = None
    version: int | None = None


class Topics:
    """Topic names of one federation."""

    def __init__(self, federation: str, prefix: str = "fedline") -> None:
        validate_site_id(federation, "federation")
        validate_site_id(prefix, "topic prefix")
        self.federation = federation
        self.root = f"{prefix}/{federation}"

    # -- sites ---------------------------------------------------------------
    def site_root(self, site: str) -> str:
        return f"{self.root}/sites/{validate_site_id(site)}"

    def update_chunk(self, site: str, msg_id: str, index: int) -> str:
        validate_site_id(msg_id, "message id")
        return f"{self.site_root(site)}/update/{msg_id}/{int(index)}"

    def updates_filter(self) -> str:
        """Every update chunk of every site (what the aggregator subscribes to)."""
        return f"{self.root}/sites/+/update/#"

    def receipts(self, site: str) -> str:
        return f"{self.site_root(site)}/receipts"

    def status(self, site: str) -> str:
        return f"{self.site_root(site)}/status"

    def fedkey(self, site: str) -> str:
        """Where the aggregator keeps (retained) the content key sealed to ``site``."""
        return f"{self.site_root(site)}/fedkey"

    def secagg_request(self, site: str) -> str:
        """Aggregator -> one cohort member: its unmask request (secure aggregation)."""
        return f"{self.site_root(site)}/secagg/request"

    def secagg_reply(self, site: str) -> str:
        """Cohort member -> aggregator: its acks and answers, signed and sealed."""
        return f"{self.site_root(site)}/secagg/reply"

    def recovery_request(self, site: str) -> str:
        """Site -> aggregator: "what did you accept from me?" after a lost data directory (signed, sealed)."""
        return f"{self.site_root(site)}/recovery/request"

    def recovery_answer(self, site: str) -> str:
        """Aggregator -> site: its last counter and the privacy it read (signed, sealed to the site)."""
        return f"{self.site_root(site)}/recovery/answer"

    def recovery_requests_filter(self) -> str:
        return f"{self.root}/sites/+/recovery/request"

    def secagg_replies_filter(self) -> str:
        return f"{self.root}/sites/+/secagg/reply"

    def secagg_cohort(self, cohort: str) -> str:
        """A signed cohort announcement (retained while the cohort is open)."""
        return f"{self.root}/secagg/cohort/{validate_site_id(cohort, 'cohort id')}"

    def secagg_survivors(self, cohort: str) -> str:
        """A signed survivors announcement (retained while the cohort is open)."""
        return f"{self.root}/secagg/survivors/{validate_site_id(cohort, 'cohort id')}"

    def secagg_filter(self) -> str:
        return f"{self.root}/secagg/#"

    def status_filter(self) -> str:
        return f"{self.root}/sites/+/status"

    def service_status(self, user: str) -> str:
        return f"{self.root}/services/{validate_site_id(user, 'service user')}/status"

    def service_status_filter(self) -> str:
        return f"{self.root}/services/+/status"

    def receipts_filter(self) -> str:
        return f"{self.root}/sites/+/receipts"

    # -- intake workers -> reducer (aggregator.intake_worker, aggregator.forward) -------------
    def forward_chunk(self, worker: str, msg_id: str, index: int) -> str:
        validate_site_id(msg_id, "message id")
        return f"{self.root}/intake/{validate_site_id(worker, 'intake worker')}/{msg_id}/{int(index)}"

    def forwards_filter(self) -> str:
        """Every worker's forwards (what the reducer subscribes to)."""
        return f"{self.root}/intake/+/+/+"

    def updates_of(self, site: str) -> str:
        """One site's update chunks (an intake worker subscribes per site of its share)."""
        return f"{self.site_root(site)}/update/#"

    # -- model ---------------------------------------------------------------
    def manifest(self) -> str:
        return f"{self.root}/model/manifest"

    def weights_chunk(self, version: int, index: int) -> str:
        return f"{self.root}/model/{int(version)}/weights/{int(index)}"

    def onnx_chunk(self, version: int, index: int) -> str:
        return f"{self.root}/model/{int(version)}/onnx/{int(index)}"

    def delta_chunk(self, version: int, index: int) -> str:
        """A chunk of the int8 step that made ``version`` from its parent (``[publish] quantise = "int8"``)."""
        return f"{self.root}/model/{int(version)}/delta/{int(index)}"

    def weights_of(self, version: int) -> str:
        """One version's weight chunks (a site following by steps fetches a version it cannot make)."""
        return f"{self.root}/model/{int(version)}/weights/#"

    def deltas_filter(self) -> str:
        """Every version's int8 step: what a site that follows the model by steps subscribes to."""
        return f"{self.root}/model/+/delta/#"

    def model_filter(self) -> str:
        return f"{self.root}/model/#"

    def weights_filter(self) -> str:
        """Every version's weight chunks, without its ONNX: what an edge needs (it exports its own ONNX)."""
        return f"{self.root}/model/+/weights/#"

    # -- parsing -------------------------------------------------------------
    def parse(self, topic: str) -> TopicInfo:
        """Name the kind of a topic of this federation; :class:`TopicError` otherwise."""
        head = self.root + "/"
        if not topic.startswith(head):
            raise TopicError(f"topic {topic!r} is not under {self.root!r}")
        parts = topic[len(head) :].split("/")
        try:
            if parts[0] == "sites" and len(parts) >= 3:
                site = validate_site_id(parts[1])
                if parts[2] == "update" and len(parts) == 5:
                    return TopicInfo(
                        "update", site=site, msg_id=validate_site_id(parts[3], "message id"), index=_index(parts[4])
                    )
                if parts[2] in ("receipts", "status", "fedkey") and len(parts) == 3:
                    return TopicInfo(parts[2], site=site)
                if parts[2] == "secagg" and len(parts) == 4 and parts[3] in ("request", "reply"):
                    return TopicInfo(f"secagg_{parts[3]}", site=site)
                if parts[2] == "recovery" and len(parts) == 4 and parts[3] in ("request", "answer"):
                    return TopicInfo(f"recovery_{parts[3]}", site=site)
            if parts[0] == "secagg" and len(parts) == 3 and parts[1] in ("cohort", "survivors"):
                return TopicInfo(f"secagg_{parts[1]}", msg_id=validate_site_id(parts[2], "cohort id"))
            if parts[0] == "intake" and len(parts) == 4:
                return TopicInfo(
                    "forward",
                    site=validate_site_id(parts[1], "intake worker"),
                    msg_id=validate_site_id(parts[2], "message id"),
                    index=_index(parts[3]),
                )
            if parts[0] == "services" and len(parts) == 3 and parts[2] == "status":
                return TopicInfo("service_status", site=validate_site_id(parts[1], "service user"))
            if parts[0] == "model":
                if parts[1:] == ["manifest"]:
                    return TopicInfo("manifest")
                if len(parts) == 4 and parts[2] in ("weights", "onnx", "delta"):
                    return TopicInfo(parts[2], version=_index(parts[1]), index=_index(parts[3]))
        except TopicError as exc:
            raise TopicError(f"topic {topic!r}: {exc}") from None
        raise TopicError(f"topic {topic!r} is not a fedline topic")


def _index(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 9:  # "²".isdigit() is True
        raise TopicError(f"{text!r} is not a non-negative integer")
    return int(text)
