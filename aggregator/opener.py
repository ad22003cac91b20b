"""Stage 1 of the intake, alone: sealed bytes in, an :class:`Opened` (accepted or refused with a reason) out.

Why a module of its own: the single-process aggregator runs it in its thread
pool (:meth:`aggregator.core.AggregatorCore.open`), and an intake worker
(:mod:`aggregator.intake_worker`) runs the very same checks in another process
or on another machine, without the store. It reads only immutable inputs
(keys, enrollment, the model's reference shapes), so it is thread-safe.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from aggregator.aligned import aligned
from aggregator.config import AggregatorConfig
from aggregator.validate import ValidationError, check_update
from broker_bridge import envelope, quantised
from broker_bridge.envelope import UpdateHeader
from broker_bridge.errors import WireError
from broker_bridge.keys import Enrollment, KeyPair, OpeningKey

State = Mapping[str, np.ndarray]  # float32 arrays, or an int8 update's Int8Delta


@dataclass
class Opened:
    """Result of stage 1 for one sealed update."""

    sealed: bytes = field(repr=False)
    header: UpdateHeader | None = None
    tensors: State | None = field(default=None, repr=False)
    norm: float = math.nan
    reason: str | None = None  # set when refused
    detail: str | None = None
    topic_site: str | None = None
    msg_id: str | None = None  # the chunking msg id, for receipts of updates whose header is unknown
    secagg: bool = False  # a masked cohort submission: decided by aggregator.secagg_cohort, not here


def read_update(blob: bytes, keys: KeyPair | OpeningKey, enrollment: Enrollment) -> tuple[UpdateHeader, State]:
    """A site's sealed update as (header, delta): opened, verified and read (:class:`WireError`).

    What a buffered update's stored bytes are read back with after a restart; an
    int8 delta is read as at intake (:class:`broker_bridge.quantised.Int8Delta`), so
    the reduce after a restart is bit for bit the one it would have been.
    """
    header, tensors = envelope.open_update(blob, keys, enrollment)
    return header, quantised.read(tensors, header.encoding)


_SIZES: dict[tuple[tuple[str, tuple[int, ...]], ...], int] = {}
# the last reference asked about and its size: every update of a core passes the same dict (a core makes a new one
# when its model's shapes change, never changes one in place), so the tuple of its items is neither built nor
# hashed per update (0.4-0.5 us)
_LAST: tuple[object, int] = (None, 0)


def _float32_bytes(reference: dict[str, tuple[int, ...]]) -> int:
    """The bytes of a float32 update of the model ``reference`` describes (worked out once per model)."""
    global _LAST
    last = _LAST  # one read: another opening thread may swap it (the pair is assigned whole)
    if last[0] is reference:
        return last[1]
    key = tuple(reference.items())
    size = _SIZES.get(key)
    if size is None:
        size = _SIZES[key] = 4 * sum(math.prod(shape) for shape in reference.values())
    _LAST = (reference, size)
    return size


def open_update(
    sealed: bytes,
    *,
    cfg: AggregatorConfig,
    keys: KeyPair | OpeningKey,
    enrollment: Enrollment,
    reference: dict[str, tuple[int, ...]],
    max_norm: float,
    topic_site: str | None = None,
    msg_id: str | None = None,
) -> Opened:
    """Decrypt, verify, parse and validate one update; refusals carry their reason (never raise on bad input).

    Replays and duplicates are not judged here: they are decided against the
    durable store, so that a resent duplicate gets its original verdict.
    """
    op = Opened(sealed if isinstance(sealed, bytes) else bytes(sealed), topic_site=topic_site, msg_id=msg_id)
    try:
        # the model's float32 tensors end the plaintext: opened onto an aligned address in libsodium's one call
        tail = None if cfg.strategy.secure_aggregation else _float32_bytes(reference)
        op.header, op.tensors = envelope.open_update(op.sealed, keys, enrollment, tensor_bytes=tail)
    except WireError as exc:
        op.reason, op.detail = exc.reason, exc.detail
        return op
    if topic_site is not None and op.header.site != topic_site:
        op.reason, op.detail = "schema", f"signed by {op.header.site!r} but sent on {topic_site!r}'s topic"
        op.header = None
        return op
    if cfg.strategy.secure_aggregation:  # only masked cohort submissions, no plain deltas
        op.secagg = set(op.tensors) == {"secagg"} and op.header.encoding == "float32"
        if not op.secagg:
            op.reason, op.detail = "secagg_required", "this federation takes masked cohort submissions only"
        return op
    try:  # the checks below see the values the model would get (header known: a receipt with its counter)
        op.tensors = quantised.read(op.tensors, op.header.encoding)  # int8 stays int8: an Int8Delta
        if not isinstance(op.tensors, quantised.Int8Delta):  # float32: the norm and the reduce run at BLAS speed
            op.tensors = aligned(op.tensors)
    except WireError as exc:
        op.reason, op.detail, op.tensors = exc.reason, exc.detail, None
        return op
    try:
        op.norm = check_update(op.header, op.tensors, reference, cfg.validation, max_norm)
    except ValidationError as exc:
        op.reason, op.detail = exc.reason, exc.detail
    return op
