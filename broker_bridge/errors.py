"""The library's exceptions: one base class, so a caller can catch everything
fedline raises on bad input without catching programming errors."""

from __future__ import annotations


class FedlineError(Exception):
    """Base of every error fedline raises on purpose."""


class WireError(FedlineError):
    """A message from the wire was refused. ``reason`` names the first check that failed.

    Reasons, in the order they are checked: ``framing`` (size and framing),
    ``version`` (format version), ``epoch`` (no federation content key of the
    message's key epoch is held: not granted yet, or revoked), ``decrypt``,
    ``signature``, ``unenrolled`` (signer not in the enrollment), ``replay``
    (per-site counter seen before), ``schema`` (payload fields, tensor shapes and dtypes),
    ``encoding`` (an update's declared tensor encoding is unknown or malformed: :mod:`broker_bridge.quantised`).
    """

    REASONS = ("framing", "version", "epoch", "decrypt", "signature", "unenrolled", "replay", "schema", "encoding")

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in self.REASONS, reason
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class ChunkError(WireError):
    """A chunk that cannot be part of any message (bad header, inconsistent totals)."""

    def __init__(self, detail: str) -> None:
        super().__init__("framing", detail)


class KeyFileError(FedlineError):
    """A key or enrollment file is missing, unreadable, too open, or of the wrong type."""

    def __init__(self, path: object, detail: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: {detail}")


class TopicError(FedlineError, ValueError):
    """A site id or topic that fedline does not accept."""


class PublishRefused(FedlineError):
    """The broker refused a publish (MQTT 5 PUBACK reason code >= 0x80)."""

    def __init__(self, reason_code: int, reason: str, topic: str) -> None:
        self.reason_code = reason_code
        self.reason = reason
        self.topic = topic
        super().__init__(f"broker refused publish to {topic!r}: {reason} (0x{reason_code:02x})")


class NotConnected(FedlineError):
    """An operation needed a broker connection and none came in time."""


class SecAggError(FedlineError):
    """A secure-aggregation message or step was refused; ``reason`` says which check failed.

    ``schema`` (malformed), ``signature`` (not signed by who it claims), ``federation`` (another
    federation), ``replay`` (a cohort announcement seen before), ``expired`` (past its deadline),
    ``not_member`` (addressed to or from a site outside the cohort), ``wrong_cohort`` (belongs to
    another cohort), ``bad_share`` (does not match the dealer's commitment), ``equivocation``
    (contradicts what this member already answered in the cohort), ``consistency`` (too few
    members acknowledged the survivors announcement), ``too_few`` (below the threshold or the
    minimum cohort size), ``state`` (step out of order, e.g. masking twice in one cohort).
    """

    REASONS = (
        "schema",
        "signature",
        "federation",
        "replay",
        "expired",
        "not_member",
        "wrong_cohort",
        "bad_share",
        "equivocation",
        "consistency",
        "too_few",
        "state",
    )

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in self.REASONS, reason
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class ModelRefused(FedlineError):
    """A global model that must not be used. ``reason`` is one word an operator can count.

    Checked where a model is taken (the edge, a plant's uplink, a line): ``manifest`` (signature or
    framing), ``epoch`` (no content key of its epoch), ``federation``, ``spec``, ``size``, ``hash``,
    ``decode``, ``names``, ``shape``, ``finite`` (the weights); a line also refuses with ``load``,
    ``width``, ``probe`` (the ONNX session), ``canary`` (worse on recent labelled rows) and ``step`` (moved
    farther from the model in service than the configured bound: :mod:`models.step_bound`); an edge
    following the model by int8 steps counts ``int8_step`` (a step that did not make the signed weights:
    it takes the version's full weights instead, :mod:`edge.follow_steps`).
    ``version`` is None when the manifest itself could not be read.
    """

    def __init__(self, reason: str, detail: str, version: int | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.version = version
        where = "model refused" if version is None else f"model version {version} refused"
        super().__init__(f"{where} ({reason}): {detail}")
