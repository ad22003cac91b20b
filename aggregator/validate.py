"""Checks an opened update must pass before it may touch the model.

Why separate from the envelope: the envelope proves *who* sent the bytes;
this proves the content is a sane delta for *this* model. Each failure names
a short reason (for counters and receipts) and a detail (for people):

- ``names``: tensor names differ from the model's shared parameters (a
  personal parameter sent by mistake lands here too);
- ``dtype``: not float32; ``shape``: a shape differs;
- ``nonfinite``: a NaN or infinity; ``norm``: L2 norm above ``max_norm``;
- ``samples``: sample count outside ``[min_samples, max_samples]``;
- ``base_version``: based on a version this aggregator never made.

These run in worker threads (numpy releases the GIL), before the serial
decision that checks staleness and duplicates against the live state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from aggregator.config import ValidationConfig
from broker_bridge.envelope import UpdateHeader
from broker_bridge.quantised import Int8Delta

_FLOAT32 = np.dtype(np.float32)
REASONS = ("names", "dtype", "shape", "nonfinite", "norm", "samples", "base_version")


class ValidationError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def check_update(
    header: UpdateHeader,
    tensors: Mapping[str, np.ndarray],
    reference: Mapping[str, tuple[int, ...]],
    cfg: ValidationConfig,
    max_norm: float | None = None,
) -> float:
    """Raise :class:`ValidationError` or return the delta's L2 norm.

    ``max_norm`` is the bound in force (:func:`aggregator.normbound.effective_bounds`); by default
    ``cfg.max_norm``.
    """
    max_norm = cfg.max_norm if max_norm is None else max_norm
    if max_norm is None:
        raise ValueError("no max_norm: pass the bound derived from [dp]")
    if not cfg.min_samples <= header.n_samples <= cfg.max_samples:
        raise ValidationError(
            "samples", f"n_samples {header.n_samples} is outside [{cfg.min_samples}, {cfg.max_samples}]"
        )
    if list(tensors) != list(reference):
        missing = [n for n in reference if n not in tensors]
        extra = [n for n in tensors if n not in reference]
        raise ValidationError(
            "names",
            f"missing {missing}, unexpected {extra}" if missing or extra else "tensors are not in the model's order",
        )
    if isinstance(tensors, Int8Delta):  # integers are finite: shapes, then the norm from the int8 blocks
        return _int8_norm(tensors, reference, max_norm)
    # one loop, no call per tensor: at 100k parameters the Python around the dots cost as much as the dots
    # (BENCHMARKS.md, "The opening's parts")
    total = 0.0
    for name, arr in tensors.items():
        shape = reference[name]
        if arr.dtype != _FLOAT32:
            raise ValidationError("dtype", f"{name!r} is {arr.dtype}, expected float32")
        if arr.shape != shape and arr.shape != tuple(shape):
            raise ValidationError("shape", f"{name!r} has shape {tuple(arr.shape)}, model expects {tuple(shape)}")
        # one pass (BLAS sdot): a NaN or inf makes the sum non-finite; only then look for which it was. np.vdot:
        # np.dot's own BLAS call (the same bits as robust.l2_norm's after a restart) over any shape, without
        # np.dot's check of the floating-point flags, which warns on an overflow or a signalling NaN (the
        # np.errstate that silenced it cost about 9 us per update)
        sq = float(np.vdot(arr, arr))
        if not math.isfinite(sq):
            if not np.isfinite(arr).all():
                raise ValidationError("nonfinite", f"{name!r} holds NaN or infinity")
            sq = math.inf  # finite values whose squares overflow: far beyond any bound
        total += sq
    return _within(math.sqrt(total), max_norm)


def _within(norm: float, max_norm: float) -> float:
    if norm > max_norm:
        raise ValidationError("norm", f"L2 norm {norm:.4g} exceeds max_norm {max_norm:.4g}")
    return norm


def _int8_norm(delta: Int8Delta, reference: Mapping[str, tuple[int, ...]], max_norm: float) -> float:
    """An int8 delta's checks without a float32 copy: its dtype is float32 by construction (int8 times
    float32 steps, each step checked finite and small enough on reading), so shapes and the norm remain."""
    for name, shape in delta.shapes.items():
        if shape != tuple(reference[name]):
            raise ValidationError("shape", f"{name!r} has shape {shape}, model expects {tuple(reference[name])}")
    return _within(delta.norm(), max_norm)
